"""Share of U-Hop stage I in a training step, for both memory sources of ``UHopSeparation``.

One training step (forward, backward, AdamW) of a kernelized model with ``W`` excluded from the task
optimiser is the reference ("plain"); the two-stage steps add stage I (one separation-loss SGD step):

- ``fresh``: a forward pass of the batch in eval mode before the task step (Algorithm 2 as written);
- ``training_forward``: the memories are cached, detached, by the task step's own forward and
  stage I runs after it (no extra forward; issue 14, target: stage I <= 10% of a step).

The three are interleaved (round-robin, median over repetitions) in one run, so machine load hits
them alike. Prints time per step, the ratio to the plain step, and stage I's share of the step.

    OMP_NUM_THREADS=1 python benchmarks/uhop_step.py [--model hopfield_vit_mini_patch4_32] [--batch 32] [--reps 20]
    OMP_NUM_THREADS=1 python benchmarks/uhop_step.py --model vih_patch4_32 --heads 8 --batch 128
    OMP_NUM_THREADS=1 python benchmarks/uhop_step.py --model hopfield_vit_nano_patch2_8 --batch 64 --every 2 4

The last one is the default job's setting (``python train.py``: nano ViT on 8x8 digits, batch 64).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout first

from hopformer.training import ClassificationModule, UHopSeparation
from hopformer.training.classification import expected_input


def build(model: str, heads: int | None, memory_sets: int | None) -> tuple[ClassificationModule, UHopSeparation, torch.optim.Optimizer]:
    kwargs = {"attention": "kernelized"}
    if heads is not None:
        kwargs["num_heads"] = heads
    module = ClassificationModule(model, backbone_kwargs=kwargs)
    callback = UHopSeparation(steps=1, lr=0.1, memory_sets=memory_sets)
    callback._build(module)
    callback.exclude_feature_maps(module)
    task = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    return module, callback, task


def task_step(module: ClassificationModule, task: torch.optim.Optimizer, images, labels) -> None:
    loss = F.cross_entropy(module(images), labels)
    task.zero_grad(set_to_none=True)
    loss.backward()
    task.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hopfield_vit_mini_patch4_32")
    p.add_argument("--heads", type=int, default=None, help="num_heads of the backbone (default: the model's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--memory-sets", type=int, default=None, help="UHopSeparation(memory_sets=...): samples per stage-I loss")
    p.add_argument("--every", type=int, nargs="*", default=[],
                   help="also time UHopSeparation(every_n_batches=n) for these n (both memory sources): stage I "
                        "on one of n steps, time per step averaged over the n steps")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    module, callback, task = build(args.model, args.heads, args.memory_sets)
    module.train()
    channels, size = expected_input(module.model)
    images = torch.randn(args.batch, channels or 3, *size)
    labels = torch.randint(0, 10, (args.batch,))

    def plain() -> None:
        task_step(module, task, images, labels)

    def fresh() -> None:
        callback.separation_step(module, (images, labels))
        task_step(module, task, images, labels)

    def training_forward() -> None:
        callback._set_flags(cache=True, grad=False)
        task_step(module, task, images, labels)
        callback.separation_step_cached()

    runs = {"plain (stage II only)": plain, "fresh (extra forward)": fresh, "training_forward": training_forward}

    def every(n: int, first) -> callable:
        def run() -> None:
            first()
            for _ in range(n - 1):
                plain()
        run.steps = n
        return run

    for n in args.every:
        if n > 1:
            runs[f"fresh, every_n_batches {n}"] = every(n, fresh)
            runs[f"training_forward, every_n_batches {n}"] = every(n, training_forward)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.warmup + args.reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if rep >= args.warmup:
                times[name].append((time.perf_counter() - start) / getattr(fn, "steps", 1))
    ref = statistics.median(times["plain (stage II only)"])
    print(f"{args.model} (kernelized{'' if args.heads is None else f', {args.heads} heads'}), batch {args.batch}, "
          f"stage-I memory sets {args.memory_sets or args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.reps} interleaved steps; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"| step | ms/step | ratio to plain | stage-I share of the step |\n| --- | --- | --- | --- |")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"| {name} | {1000 * t:.1f} | {t / ref:.2f}x | {100 * (t - ref) / t:.1f}% |")


if __name__ == "__main__":
    main()
