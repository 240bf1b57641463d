"""Continuous-time vs discrete Hopfield memories (Santos et al. 2025, Sections 5.1-5.3, adapted).

Memories are ``L`` samples of a smooth signal; queries are the memories corrupted by masking half
of their features (set to 0) or by additive Gaussian noise. Compared, by the mean cosine
similarity between the retrieved pattern and the uncorrupted memory:

* ``discrete-L``: modern Hopfield with all ``L`` memories;
* ``discrete-sub``: modern Hopfield with ``N`` memories subsampled evenly (a fair size match);
* ``continuous``: the ``L`` memories compressed to ``N`` rectangular boxes (ridge, eq. 5), Gibbs
  update (7) in closed form (``--gaussian`` adds Gaussian RBFs with the trapezoid rule, K=500).

Sources: ``synthetic`` (random smooth trajectories, D=64), ``etth1`` (sliding 24-hour windows of
the 7 ETTh1 channels, standardised on the training rows, D=168; hourly steps make neighbouring
windows correlated), ``cifar-pan`` (frames of a slow pan over CIFAR-10 mosaics in [-1, 1],
D=3072, the lower half masked: the paper's video setting). Missing data sources are skipped.

Outputs (CSV + PNG in the run folder): ``retrieval.csv``, ``cosine_<source>_<corruption>.png``
(like Figures 2-3) and ``energy_contours.png`` (like Figure 1: 20 2-D memories on a circle, a line
and a sinusoid, discrete vs 10 boxes, beta = 1, with update trajectories).

Run: ``python -m hopformer.experiments.continuous_memory [--full]``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..functional import hopfield_energy, hopfield_retrieve
from ..functional.continuous import (
    continuous_energy,
    continuous_retrieve,
    gaussian_basis,
    memory_positions,
    rectangular_basis,
    ridge_coefficients,
    ridge_factor,
    trapezoid_rule,
)
from . import add_common_arguments, run_dir
from .reporting import RunReport, print_table, progress
from .sequence_memory import cifar_movie


def synthetic_signals(count: int, length: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """``count`` smooth trajectories ``(count, L, D)``: random low-frequency Fourier series."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length, dtype=torch.float64)
    freqs = torch.arange(1, 9, dtype=torch.float64)
    coef = torch.randn(count, 8, dim, generator=gen, dtype=torch.float64) / freqs[:, None]
    phase = torch.rand(count, 8, dim, generator=gen, dtype=torch.float64) * 6.283
    return (coef[:, None] * torch.sin(6.283 * freqs[None, None, :, None] * t[None, :, None, None] + phase[:, None])).sum(2)


def etth1_signals(data_dir: Path, count: int, length: int, window: int = 24, seed: int = 0) -> torch.Tensor | None:
    """``count`` memory sets of ``L`` consecutive 24-hour windows of ETTh1 ``(count, L, 24 * 7)``."""
    path = data_dir / "ett" / "ETTh1.csv"
    if not path.is_file():
        return None
    import pandas as pd

    values = pd.read_csv(path).drop(columns=["date"]).to_numpy(dtype=np.float64)
    train = values[:8640]
    values = (values - train.mean(0)) / train.std(0)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(values) - length - window, size=count)
    sets = [np.stack([values[s + i : s + i + window].reshape(-1) for i in range(length)]) for s in starts]
    return torch.from_numpy(np.stack(sets))


def cifar_signals(data_dir: Path, count: int, length: int, seed: int = 0) -> torch.Tensor | None:
    if not (data_dir / "cifar10" / "train").is_dir():
        return None
    movies = [cifar_movie(length, scene_length=length, data_dir=data_dir, seed=seed + i)[0] for i in range(count)]
    return torch.stack(movies) * 2.0 - 1.0


def corrupt(memories: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Queries: the second half of the features zeroed (``mask``), or Gaussian noise (``noise<k>``: std ``k`` x the data's)."""
    if kind == "mask":
        query = memories.clone()
        query[..., memories.shape[-1] // 2 :] = 0.0
        return query
    scale = float(kind.removeprefix("noise")) * memories.std()
    return memories + scale * torch.randn(memories.shape, generator=gen, dtype=memories.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1).mean()


def compare(memories: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor, num_basis: int, beta: float, steps: int,
            ridge: float, gaussian: bool) -> dict[str, float]:
    """Cosine similarities of the three memories (and optionally Gaussian RBFs) for one ``N``."""
    length = memories.shape[-2]
    t = memory_positions(length, dtype=memories.dtype)
    result = {"discrete-L": cosine(hopfield_retrieve(queries, memories, beta=beta, steps=steps), targets).item()}
    idx = torch.linspace(0, length - 1, num_basis).round().long()
    sub = memories[..., idx, :]
    result["discrete-sub"] = cosine(hopfield_retrieve(queries, sub, beta=beta, steps=steps), targets).item()
    coef = ridge_coefficients(memories, ridge_factor(rectangular_basis(t, num_basis).T, ridge))
    result["continuous"] = cosine(continuous_retrieve(queries, coef, beta=beta, steps=steps), targets).item()
    if gaussian:
        centers = memory_positions(num_basis, dtype=memories.dtype)
        widths = torch.full((num_basis,), 1.0 / num_basis, dtype=memories.dtype)
        g_coef = ridge_coefficients(memories, ridge_factor(gaussian_basis(t, centers, widths).T, ridge))
        nodes, weights = trapezoid_rule(500, dtype=memories.dtype)
        psi = gaussian_basis(nodes, centers, widths)
        out = continuous_retrieve(queries, g_coef, beta=beta, steps=steps, psi=psi, quad_weights=weights)
        result["continuous-gaussian"] = cosine(out, targets).item()
    return result


def energy_contours(path: Path) -> None:
    """Figure 1 analogue: energy contours and update trajectories, discrete (top) vs 10 boxes (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.linspace(0, 1, 20, dtype=torch.float64)
    shapes = {
        "circle": torch.stack([torch.cos(6.283 * t * 0.95), torch.sin(6.283 * t * 0.95)], -1),
        "line": torch.stack([2 * t - 1, 0.5 * (2 * t - 1)], -1),
        "sinusoid": torch.stack([2 * t - 1, 0.6 * torch.sin(6.283 * t)], -1),
    }
    grid = torch.linspace(-1.6, 1.6, 120, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    starts = torch.tensor([[-1.2, 1.2], [1.3, -1.1], [0.2, 1.4], [-1.4, -0.6]], dtype=torch.float64)
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for col, (name, mem) in enumerate(shapes.items()):
        coef = ridge_coefficients(mem, ridge_factor(rectangular_basis(memory_positions(20, dtype=torch.float64), 10).T, 1e-3))
        for row, (label, energy, step) in enumerate((
            ("discrete (L=20)", lambda q: hopfield_energy(q, mem, beta=1.0),
             lambda q: hopfield_retrieve(q, mem, beta=1.0)),
            ("continuous (N=10 boxes)", lambda q: continuous_energy(q, coef, beta=1.0),
             lambda q: continuous_retrieve(q, coef, beta=1.0)),
        )):
            ax = axes[row, col]
            ax.contourf(gx, gy, energy(points).reshape(gx.shape), levels=30, cmap="Blues_r")
            ax.plot(mem[:, 0], mem[:, 1], "o", color="green", ms=4)
            if row == 1:
                fine = coef.T @ rectangular_basis(torch.linspace(0, 1, 400, dtype=torch.float64), 10).T
                ax.plot(fine[0], fine[1], color="green", lw=1)
            for q in starts:
                traj = [q]
                for _ in range(10):
                    traj.append(step(traj[-1][None])[0])
                traj = torch.stack(traj)
                ax.plot(traj[:, 0], traj[:, 1], "-", color="red", lw=1)
                ax.plot(traj[-1, 0], traj[-1, 1], "x", color="red")
            ax.set(title=f"{name}: {label}", xlim=(-1.6, 1.6), ylim=(-1.6, 1.6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPECTED_TIME = ("Expected time: about 1-2 minutes with the defaults on 1 CPU thread; --full takes tens of minutes "
                 "(run it under flock /tmp/hopformer-heavy.lock on a shared machine).")
RESULT_COLUMNS = ("source", "corruption", "L", "N", "continuous_mean", "discrete-sub_mean", "discrete-L_mean")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hopformer.experiments.continuous_memory",
                                     description=__doc__.split("\n")[0], epilog=EXPECTED_TIME,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="memory sizes L")
    parser.add_argument("--num-basis", type=int, nargs="+", default=[16, 64, 256], help="basis sizes N (<= L)")
    parser.add_argument("--sets", type=int, default=4, help="memory sets (videos) per source")
    parser.add_argument("--queries", type=int, default=128, help="queries per set (memories picked evenly)")
    parser.add_argument("--beta", type=float, nargs="+", default=None,
                        help="inverse temperature (first value used for every source; default 4 / sqrt(D))")
    parser.add_argument("--steps", type=int, default=1, help="retrieval (update) steps of every memory")
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 3.0], help="noise std in units of the data std")
    parser.add_argument("--ridge", type=float, default=1e-3, help="ridge penalty of the continuous memory's fit (eq. 5)")
    parser.add_argument("--sources", nargs="+", default=["synthetic", "etth1", "cifar-pan"],
                        help="signal sources (missing data sources are skipped)")
    parser.add_argument("--gaussian", action="store_true", help="also Gaussian RBFs with the trapezoid rule")
    parser.add_argument("--full", action="store_true", help="L up to 4096, N up to 1024, 8 sets, Gaussian RBFs")
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.full:
        args.lengths, args.num_basis, args.sets, args.gaussian = [512, 1024, 2048, 4096], [16, 64, 256, 1024], 8, True
    out = run_dir("continuous_memory", args)
    report = RunReport("continuous_memory", out)
    energy_contours(out / "energy_contours.png")

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    kinds = ["mask"] + [f"noise{k:g}" for k in args.noise]
    total = len(args.sources) * sum(len(kinds) * sum(n <= length for n in args.num_basis) for length in args.lengths)
    bar = progress(total=total, desc="continuous memory", disable=args.no_progress)
    for source in args.sources:
        for length in args.lengths:
            if source == "synthetic":
                data = synthetic_signals(args.sets, length, seed=args.seed)
            elif args.data_dir is None:
                data = None
            elif source == "etth1":
                data = etth1_signals(args.data_dir, args.sets, length, seed=args.seed)
            else:
                data = cifar_signals(args.data_dir, args.sets, length, seed=args.seed)
            if data is None:
                bar.write(f"skipping {source}: data not found under --data-dir {args.data_dir}")
                rest = args.lengths[args.lengths.index(length):]
                bar.update(len(kinds) * sum(n <= rest_l for rest_l in rest for n in args.num_basis))
                break
            dim = data.shape[-1]
            beta = 4.0 / dim**0.5 if args.beta is None else args.beta[0]
            pick = torch.linspace(0, length - 1, min(args.queries, length)).round().long()
            for kind in kinds:
                queries = corrupt(data, kind, gen)[:, pick]
                for n in args.num_basis:
                    if n > length:
                        continue
                    scores = {}
                    for s in range(args.sets):  # per memory set, so the paper's mean +- std across videos
                        res = compare(data[s], queries[s], data[s, pick], n, beta, args.steps, args.ridge, args.gaussian)
                        for k, v in res.items():
                            scores.setdefault(k, []).append(v)
                    row = {"source": source, "dim": dim, "corruption": kind, "L": length, "N": n, "beta": beta}
                    for k, v in scores.items():
                        row[f"{k}_mean"], row[f"{k}_std"] = float(np.mean(v)), float(np.std(v))
                    rows.append(row)
                    bar.update()
    bar.close()
    print_table(rows, "mean cosine similarity to the uncorrupted memory (higher is better; std in retrieval.csv)",
                columns=[c for c in RESULT_COLUMNS if any(c in r for r in rows)])
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else 99)
    with open(out / "retrieval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for source in {r["source"] for r in rows}:
        for kind in sorted({r["corruption"] for r in rows}):
            sel = [r for r in rows if r["source"] == source and r["corruption"] == kind]
            lengths = sorted({r["L"] for r in sel})
            fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
            for ax, length in zip(axes[0], lengths):
                part = [r for r in sel if r["L"] == length]
                ns = [r["N"] for r in part]
                for method in ("continuous", "continuous-gaussian", "discrete-sub", "discrete-L"):
                    if f"{method}_mean" not in part[0]:
                        continue
                    mean = np.array([r[f"{method}_mean"] for r in part])
                    std = np.array([r[f"{method}_std"] for r in part])
                    ax.errorbar(ns, mean, yerr=std, marker="o", capsize=3, label=method)
                ax.set_xscale("log", base=2)
                ax.set_xticks(ns, [str(n) for n in ns])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set(xlabel="N (basis functions / subsampled memories)", ylabel="cosine similarity",
                       title=f"{source}, {kind}, L={length}")
            axes[0][0].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"cosine_{source}_{kind}.png", dpi=110)
            plt.close(fig)
    report.finish(vars(args), {"retrieval": rows})
    return out


if __name__ == "__main__":
    main()
