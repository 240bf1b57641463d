"""One training step (forward, backward, AdamW) of a Hopfield ViT, ratio to timm's own ViT of the same size.

The reference is timm's ``VisionTransformer`` with the same shape as the Hopfield model (its
attention is fused SDPA), measured in the same run, round-robin with the Hopfield variants.
With ``--compile`` each model is also run through ``torch.compile`` (compile time printed apart,
then steps timed) and the compiled/eager speedup is printed. Target (issue 14): the sparse
variants <= 1.05x timm.

    flock /tmp/hopformer-heavy.lock python benchmarks/training_step.py --threads 1
    python benchmarks/training_step.py --model hopfield_vit_mini_patch4_32 --batch 32 --repeats 5
    python benchmarks/training_step.py --compile --variants softmax sparsemax
    python benchmarks/training_step.py --threads 1 --ab      # + each sparse variant on the torch-op kernels
    python benchmarks/training_step.py --threads 1 --repeats 20 --stat min   # minimum of the rounds (noisy machines)

With ``--ab [PATH]`` every sparse variant is also timed on the sparse kernels of another path
(``hopformer.functional.set_kernel_path``: ``torch``, the default, for the torch-op kernels before
the fused C++ kernels; ``reference`` for those before the small-sequence work), interleaved in the
same run, and the ratio current / that path is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout first
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hopformer  # noqa: E402
import hopformer.models  # noqa: E402,F401  (registers the Hopfield ViTs)
from _common import add_stat_option, interleaved, machine_line, on_kernel_path  # noqa: E402
from hopformer.models.vit import HOPFIELD_VIT_MODELS  # noqa: E402

VARIANTS: Dict[str, dict] = {
    "softmax": dict(separation="softmax"),
    "sparsemax": dict(separation="sparsemax"),
    "entmax15": dict(separation="entmax15"),
    "learnable alpha": dict(separation="learnable"),
    "kernelized (U-Hop stage II)": dict(attention="kernelized"),
}


def build(name: str, model: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if name == "timm ViT (reference)":
        cfg = {k: v for k, v in HOPFIELD_VIT_MODELS[model].items()}
        return timm.models.vision_transformer.VisionTransformer(**cfg).to(device)
    return timm.create_model(model, **VARIANTS[name]).to(device)


def stepper(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, call: Callable | None = None) -> Callable:
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    call = call if call is not None else net

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(call(images), labels).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hopfield_vit_mini_patch4_32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=["softmax", "sparsemax", "entmax15", "learnable alpha"],
                        choices=list(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also torch.compile each model")
    parser.add_argument("--ab", nargs="?", const="torch", default=None, choices=["torch", "reference", "native", "rows"],
                        help="also each sparse variant on the kernels of this path (default: torch)")
    add_stat_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_line(), f"\nhopformer from {os.path.dirname(hopformer.__file__)}, workers={hopformer.get_num_workers()}")
    cfg = HOPFIELD_VIT_MODELS[args.model]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"], generator=gen).to(device)
    labels = torch.randint(0, cfg["num_classes"], (args.batch,), generator=gen).to(device)
    runs: Dict[str, Callable] = {}
    for name in ["timm ViT (reference)", *args.variants]:
        net = build(name, args.model, device)
        runs[name] = stepper(net, images, labels)
        if args.ab and name not in ("timm ViT (reference)", "softmax"):
            runs[f"{name} [{args.ab} kernels]"] = on_kernel_path(
                stepper(build(name, args.model, device), images, labels), args.ab)
        if args.compile:
            compiled = torch.compile(net)
            t0 = time.perf_counter()
            step = stepper(net, images, labels, compiled)
            step()
            print(f"compile {name}: {time.perf_counter() - t0:.1f} s (first step)", flush=True)
            runs[name + " [compiled]"] = step
    med = interleaved(runs, args.repeats, device, stat=args.stat)
    ref = med["timm ViT (reference)"]
    print(f"\n### training step {args.model}, batch {args.batch}, device={device}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats} stat={args.stat}")
    print(f"| {'model':40s} | {'ms/step':>8s} | {'x timm':>6s} |" + (" compiled speedup |" if args.compile else ""))
    print("|---|---|---|" + ("---|" if args.compile else ""))
    for name, t in med.items():
        if name.endswith("[compiled]"):
            continue
        row = f"| {name:40s} | {t * 1e3:8.1f} | {t / ref:6.2f} |"
        if f"{name} [{args.ab} kernels]" in med:
            row += f" current / {args.ab} kernels {t / med[f'{name} [{args.ab} kernels]']:.3f} |"
        if args.compile:
            tc = med[name + " [compiled]"]
            row = row + f" {t / tc:5.2f}x ({tc * 1e3:.1f} ms, {tc / ref:.2f}x timm) |"
        print(row)


if __name__ == "__main__":
    main()
