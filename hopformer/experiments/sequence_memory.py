"""Temporal-kernel sequence memory on movies of real images (Farooq 2025, arXiv 2507.01052).

A "movie" is a slow pan (one pixel per frame) of a 32x32 window across 64x64 mosaics of four
CIFAR-10 images, with a scene cut (a new mosaic) every ``--scene-length`` frames: consecutive frames
are strongly correlated, cuts are abrupt. Without the CIFAR-10 folder, smooth synthetic frames
are used instead. Reports (CSV + PNG in the run folder):

* ``retrieval.csv``: accuracy (the retrieved state's nearest stored frame is the target) and MSE per
  frame for both solvers (normalised space, norm sqrt(d); and pixel space [0, 1]);
* ``sensitivity.csv`` / ``sensitivity.png``: accuracy and MSE over lambda_f x sigma;
* ``timing.csv`` / ``timing.png``: seconds per frame of both solvers as N grows;
* ``energy.png``: the energy along a retrieval (per step, and per iteration at a few steps).

Run: ``python -m hopformer.experiments.sequence_memory [--frames 2000] [--full]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..layers.sequence_memory import TemporalSequenceMemory
from . import add_common_arguments, run_dir
from .reporting import RunReport, print_table, progress

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _load_cifar(folder: Path, rng: np.random.Generator, count: int) -> np.ndarray:
    from PIL import Image

    images = []
    for _ in range(count):
        cls = CLASSES[rng.integers(len(CLASSES))]
        files = sorted((folder / cls).glob("*.jpg"))
        images.append(np.asarray(Image.open(files[rng.integers(len(files))]).convert("RGB"), dtype=np.float32) / 255.0)
    return np.stack(images)


def _pan_path(size: int, window: int) -> list[tuple[int, int]]:
    """A snake path of the window's corner over a ``size x size`` image, one pixel per step."""
    span = size - window + 1
    return [(r, c if r % 2 == 0 else span - 1 - c) for r in range(span) for c in range(span)]


def cifar_movie(frames: int, *, scene_length: int = 200, data_dir: Path | None = None, seed: int = 0):
    """Frames ``(frames, 32*32*3)`` in [0, 1] (HWC flattened) and the scene index of each frame.

    Real CIFAR-10 mosaics when ``data_dir/cifar10/train`` exists, smooth synthetic frames otherwise.
    """
    rng = np.random.default_rng(seed)
    folder = None if data_dir is None else Path(data_dir) / "cifar10" / "train"
    path = _pan_path(64, 32)
    out, scenes = [], []
    scene = 0
    while len(out) < frames:
        if folder is not None and folder.is_dir():
            tiles = _load_cifar(folder, rng, 4)
            mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        else:  # synthetic fallback: a smooth random colour field
            yy, xx = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64), indexing="ij")
            mosaic = np.stack([0.5 + 0.5 * np.sin(rng.uniform(2, 12) * xx + rng.uniform(2, 12) * yy + rng.uniform(0, 6))
                               for _ in range(3)], -1)
        start = rng.integers(len(path))
        for i in range(min(scene_length, frames - len(out))):
            r, c = path[(start + i) % len(path)]
            out.append(mosaic[r : r + 32, c : c + 32].reshape(-1))
            scenes.append(scene)
        scene += 1
    return torch.from_numpy(np.stack(out)).double(), np.asarray(scenes)


def _centred(frames: torch.Tensor) -> torch.Tensor:
    return frames * 2.0 - 1.0  # pixels to [-1, 1] before the memory normalises to norm sqrt(d)


def evaluate(memory: TemporalSequenceMemory, frames: torch.Tensor, states: torch.Tensor) -> dict:
    """Accuracy (nearest stored frame is the target) and MSE, normalised and pixel space."""
    xi = memory.patterns
    nearest = torch.cat([torch.cdist(chunk, xi).argmin(-1) for chunk in states.split(512)])
    correct = (nearest == torch.arange(len(xi))).double()
    mse = (states - xi).square().mean(-1)
    scale = _centred(frames).norm(dim=-1, keepdim=True) / math.sqrt(xi.shape[1])
    pixels = (states * scale + 1.0) / 2.0
    mse_pixels = (pixels - frames).square().mean(-1)
    return {
        "accuracy": correct.mean().item(),
        "mse_mean": mse.mean().item(),
        "mse_max": mse.max().item(),
        "frames_mse_below_1e-4": (mse < 1e-4).double().mean().item(),
        "pixel_mse_mean": mse_pixels.mean().item(),
        "pixel_mse_max": mse_pixels.max().item(),
    }


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _timed(memory, solver, **kw):
    start = time.perf_counter()
    result = memory.retrieve(solver=solver, **kw)
    return result, time.perf_counter() - start


EXPECTED_TIME = ("Expected time: about 2 minutes with the defaults on 1 CPU thread (most of it in L-BFGS-B and the "
                 "timing sweep); --full takes much longer (run it under flock /tmp/hopformer-heavy.lock on a shared machine).")
SENSITIVITY_GRID = [(lambda_f, sigma) for lambda_f in (0.0, 0.1, 1.0, 10.0, 100.0, 500.0) for sigma in (0.5, 1.0, 2.0, 5.0)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hopformer.experiments.sequence_memory",
                                     description=__doc__.split("\n")[0], epilog=EXPECTED_TIME,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000, help="frames of the main movie (paper: up to 2000)")
    parser.add_argument("--scene-length", type=int, default=200, help="frames between scene cuts")
    parser.add_argument("--faithful-frames", type=int, default=500, help="frames retrieved with L-BFGS-B (slow)")
    parser.add_argument("--sensitivity-frames", type=int, default=300,
                        help="frames of the lambda_f x sigma sensitivity grid (sequential CCCP)")
    parser.add_argument("--timing", type=int, nargs="+", default=[250, 500, 1000, 2000],
                        help="sequence lengths N of the time-per-frame sweep")
    parser.add_argument("--lbfgs-timing-max", type=int, default=1000, help="largest N timed with L-BFGS-B")
    parser.add_argument("--full", action="store_true", help="bigger runs: faithful on all frames, N up to 8000")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.full:
        args.faithful_frames, args.lbfgs_timing_max = args.frames, 4000
        args.timing = sorted(set(args.timing + [4000, 8000]))
    out = run_dir("sequence_memory", args)
    report = RunReport("sequence_memory", out)
    frames, scenes = cifar_movie(max(args.frames, max(args.timing)), scene_length=args.scene_length,
                                 data_dir=args.data_dir, seed=args.seed)
    source = "cifar10-pan" if args.data_dir is not None and (args.data_dir / "cifar10" / "train").is_dir() else "synthetic"
    print(f"movie: {source}, {len(frames)} frames, d={frames.shape[1]}, cuts every {args.scene_length}")

    # 1. retrieval of the main movie, paper settings (lambda_f = 500, sigma = 2)
    main_frames = frames[: args.frames]
    memory = TemporalSequenceMemory(lambda_f=500.0, sigma=2.0).store(_centred(main_frames))
    cut = args.scene_length if args.frames > args.scene_length else 1
    traced = (1, cut, min(cut + 1, args.frames - 1))
    rows = []
    stages = progress(total=4, desc="retrieval: CCCP batched", disable=args.no_progress)
    fast, t_fast = _timed(memory, "cccp")
    fast.energy = memory.step_energies(fast.states)
    rows.append({"solver": "cccp-batched", "frames": args.frames, "seconds": t_fast, "sweeps": fast.iterations[0],
                 **evaluate(memory, main_frames, fast.states)})
    memory.batched = False
    stages.update()
    stages.set_description("retrieval: CCCP sequential")
    seq, t_seq = _timed(memory, "cccp", trace_steps=traced)
    rows.append({"solver": "cccp-sequential", "frames": args.frames, "seconds": t_seq,
                 "sweeps": float(np.mean(seq.iterations)), **evaluate(memory, main_frames, seq.states)})
    memory.batched = True
    n_f = min(args.faithful_frames, args.frames)
    faithful_memory = TemporalSequenceMemory(lambda_f=500.0, sigma=2.0).store(_centred(main_frames[:n_f]))
    stages.update()
    stages.set_description(f"retrieval: L-BFGS-B ({n_f} frames)")
    slow, t_slow = _timed(faithful_memory, "lbfgs", trace_steps=tuple(m for m in traced if m < n_f))
    slow.energy = faithful_memory.step_energies(slow.states)
    rows.append({"solver": "lbfgs-b", "frames": n_f, "seconds": t_slow, "sweeps": float(np.mean(slow.iterations)),
                 **evaluate(faithful_memory, main_frames[:n_f], slow.states)})
    stages.update()
    stages.set_description("retrieval: CCCP vs L-BFGS-B")
    agree = (slow.states - faithful_memory.retrieve(solver="cccp").states).abs().max().item()
    stages.update()
    stages.close()
    for row in rows:
        row["max_abs_diff_fast_vs_lbfgs"] = agree
    _write(out / "retrieval.csv", rows)
    print_table(rows, "retrieval of the movie (accuracy: nearest stored frame is the target; MSE per frame)",
                columns=["solver", "frames", "seconds", "sweeps", "accuracy", "mse_mean", "mse_max", "pixel_mse_mean",
                         "max_abs_diff_fast_vs_lbfgs"])

    # 2. energy along the retrieval
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(fast.energy.numpy(), lw=0.8, label="CCCP (batched)")
    axes[0].plot(slow.energy.numpy(), "--", lw=0.8, label=f"L-BFGS-B (first {n_f})")
    for c in range(args.scene_length, args.frames, args.scene_length):
        axes[0].axvline(c, color="grey", lw=0.4)
    axes[0].set(xlabel="step m", ylabel="E_m(s*_m)", title="energy at each retrieved frame (grey: scene cuts)")
    axes[0].legend()
    for m, trace in seq.trace.items():
        axes[1].plot(np.asarray(trace) - trace[-1] + 1e-12, marker="o", label=f"CCCP step {m}")
    for m, trace in slow.trace.items():
        axes[1].plot(np.asarray(trace) - trace[-1] + 1e-12, marker="x", ls="--", label=f"L-BFGS-B step {m}")
    axes[1].set(yscale="log", xlabel="iteration", ylabel="E - E_final", title="energy along the iterations")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "energy.png", dpi=120)
    plt.close(fig)

    # 3. sensitivity to lambda_f and sigma (sequential CCCP, the paper's step-by-step procedure)
    sens_frames = frames[: args.sensitivity_frames]
    sens = []
    for lambda_f, sigma in progress(SENSITIVITY_GRID, desc="sensitivity lambda_f x sigma", disable=args.no_progress):
        mem = TemporalSequenceMemory(lambda_f=lambda_f, sigma=sigma, batched=False, max_iter=200)
        mem.store(_centred(sens_frames))
        states = mem.retrieve().states
        sens.append({"lambda_f": lambda_f, "sigma": sigma, **evaluate(mem, sens_frames, states)})
    _write(out / "sensitivity.csv", sens)
    print_table(sens, f"sensitivity ({len(sens_frames)} frames, sequential CCCP)",
                columns=["lambda_f", "sigma", "accuracy", "mse_mean", "pixel_mse_mean"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for sigma in (0.5, 1.0, 2.0, 5.0):
        sel = [r for r in sens if r["sigma"] == sigma]
        x = [max(r["lambda_f"], 0.01) for r in sel]
        axes[0].plot(x, [r["accuracy"] for r in sel], marker="o", label=f"sigma={sigma}")
        axes[1].plot(x, [r["mse_mean"] for r in sel], marker="o", label=f"sigma={sigma}")
    axes[0].set(xscale="log", xlabel="lambda_f (0 drawn at 0.01)", ylabel="accuracy", title=f"N={len(sens_frames)}")
    axes[1].set(xscale="log", yscale="log", xlabel="lambda_f", ylabel="MSE per frame")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=120)
    plt.close(fig)

    # 4. time per frame as N grows
    timing = []
    for n in progress(args.timing, desc="timing per frame", disable=args.no_progress):
        mem = TemporalSequenceMemory(lambda_f=500.0, sigma=2.0).store(_centred(frames[:n]))
        entry = {"frames": n}
        for name, solver, batched in (("cccp-batched", "cccp", True), ("cccp-sequential", "cccp", False),
                                      ("lbfgs-b", "lbfgs", True)):
            if solver == "lbfgs" and n > args.lbfgs_timing_max:
                entry[f"{name}_ms_per_frame"] = float("nan")
                continue
            mem.batched = batched
            _, seconds = _timed(mem, solver)
            entry[f"{name}_ms_per_frame"] = 1e3 * seconds / n
        timing.append(entry)
    _write(out / "timing.csv", timing)
    print_table(timing, "retrieval time per frame (ms; nan: not timed)")
    fig, ax = plt.subplots(figsize=(5, 4))
    for key in timing[0]:
        if key != "frames":
            ax.plot([r["frames"] for r in timing], [r[key] for r in timing], marker="o", label=key.replace("_ms_per_frame", ""))
    ax.set(xscale="log", yscale="log", xlabel="N (frames)", ylabel="ms per frame", title="retrieval time per frame")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "timing.png", dpi=120)
    plt.close(fig)
    report.finish(vars(args), {"retrieval": rows, "sensitivity": sens, "timing": timing}, {"movie": source})
    return out


if __name__ == "__main__":
    main()
