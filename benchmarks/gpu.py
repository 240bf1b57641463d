"""Every CUDA path in one run: attention cores, sparse blocks, bf16 autocast, training steps, DDP.

Prints the same ratio tables as the CPU benchmarks, on the first GPU:

1. attention cores (``separation.py`` tables, float32, L = 64 ... 4096, peak memory from the caching
   allocator): SDPA vs the block-wise sparsemax / entmax15 / alpha / learnable-alpha cores;
2. the same cores under ``torch.autocast("cuda", torch.bfloat16)`` (SDPA runs in bf16; the sparse
   cores switch autocast off and compute in float32, the dtype of their inputs);
3. one training step of ``hopfield_vit_mini_patch4_32`` (batch 128) vs timm's ViT, eager and bf16
   autocast, with ``--compile`` also compiled (``training_step.py``);
4. STanHop-Net at the ETTh1-96 paper setting vs the Crossformer-style reference (``stanhop.py``);
5. with more than one GPU: DDP training steps of the mini ViT on 2 GPUs (sparsemax and timm),
   time per step and the scaling against one GPU.

Without a GPU it prints a message and exits with status 0.

    python benchmarks/gpu.py                 # everything
    python benchmarks/gpu.py --skip ddp stanhop --compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # this checkout first
sys.path.insert(0, HERE)


def _cores(lengths, repeats: int, bf16: bool) -> None:
    import separation

    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    print(f"\n## attention cores, {'bf16 autocast' if bf16 else 'float32'}")
    with ctx:
        for length in lengths:
            separation.bench(length, repeats, torch.device("cuda"), maps=False, pkg=False, memory=True)


def _training(batch: int, repeats: int, bf16: bool, compile_: bool) -> None:
    import timm
    import training_step as ts
    from _common import interleaved

    device = torch.device("cuda")
    model = "hopfield_vit_mini_patch4_32"
    cfg = ts.HOPFIELD_VIT_MODELS[model]
    images = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device=device)
    labels = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    runs = {}
    for name in ["timm ViT (reference)", "softmax", "sparsemax", "entmax15", "learnable alpha"]:
        net = ts.build(name, model, device)
        call = torch.compile(net) if compile_ else net

        def fwd(x, call=call):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                return call(x)

        runs[name] = ts.stepper(net, images, labels, fwd)
    med = interleaved(runs, repeats, device, warmup=2)
    ref = med["timm ViT (reference)"]
    print(f"\n## training step {model}, batch {batch}, {'bf16 autocast' if bf16 else 'float32'}"
          f"{', compiled' if compile_ else ''} (timm {timm.__version__})")
    print("| model | ms/step | x timm |\n|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t * 1e3:.2f} | {t / ref:.2f} |")


def _ddp_worker(rank: int, world: int, port: int, steps: int, queue) -> None:
    import torch.distributed as dist
    import timm
    import torch.nn.functional as F

    import hopformer.models  # noqa: F401

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    out = {}
    for sep in ("softmax", "sparsemax"):
        torch.manual_seed(0)
        net = torch.nn.parallel.DistributedDataParallel(
            timm.create_model("hopfield_vit_mini_patch4_32", separation=sep).cuda(), device_ids=[rank])
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(128, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (128,), device="cuda")
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
        torch.cuda.synchronize()
        out[sep] = (time.perf_counter() - t0) / steps
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def _ddp(steps: int) -> None:
    import torch.multiprocessing as mp

    count = torch.cuda.device_count()
    if count < 2:
        print("\n## DDP: skipped (one GPU)")
        return
    results = {}
    for world in (1, 2):
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        procs = [ctx.Process(target=_ddp_worker, args=(r, world, 29500 + world, steps, queue)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results[world] = queue.get()
    print("\n## DDP, hopfield_vit_mini_patch4_32, batch 128 per GPU")
    print("| separation | 1 GPU ms/step | 2 GPUs ms/step | scaling (2 x samples/s) |\n|---|---|---|---|")
    for sep in results[1]:
        t1, t2 = results[1][sep], results[2][sep]
        print(f"| {sep} | {t1 * 1e3:.2f} | {t2 * 1e3:.2f} | {2 * t1 / t2:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also compiled training steps")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cores", "bf16", "training", "stanhop", "ddp"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device available (torch.cuda.is_available() is False); nothing to measure. "
              "Run the CPU benchmarks instead (benchmarks/separation.py, training_step.py, stanhop.py, workers.py).")
        return 0
    from _common import machine_line

    print(machine_line(), f"\nGPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, "
          f"CUDA {torch.version.cuda}")
    if "cores" not in args.skip:
        _cores(args.lengths, args.repeats, bf16=False)
    if "bf16" not in args.skip:
        _cores(args.lengths, args.repeats, bf16=True)
    if "training" not in args.skip:
        for bf16 in (False, True):
            _training(128, args.repeats, bf16, compile_=False)
        if args.compile:
            _training(128, args.repeats, True, compile_=True)
    if "stanhop" not in args.skip:
        import stanhop

        sys.argv = [sys.argv[0], "--device", "cuda", "--steps", str(args.repeats), "--hopfield", "generalized",
                    "dense", "sparse"]
        stanhop.main()
    if "ddp" not in args.skip:
        _ddp(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
