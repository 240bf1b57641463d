"""Memory-retrieval experiments of the U-Hop paper (Section 4.1, Fig. 3 and 5, Appendix F.2-F.3).

- capacity sweep: memory sets of growing size, queries with a fraction of the pixels set to zero
  (no rescaling of the kept pixels), one retrieval step;
- noise sweep: a fixed memory-set size, queries ``xi + n`` with Gaussian noise rescaled to
  ``||n|| = level * ||xi||``;
- stage-I sweep: U-Hop's error against the number ``N`` of stage-I steps (from one run per memory set).

Every model of :data:`MODELS` runs on the same memory sets and queries; the error is the sum of squared
pixel differences between the retrieved and the true image, averaged over the memory set (every stored
image is queried once). Results: a row per run in ``runs.csv``, mean/std over seeds in ``summary.csv``,
plots ``capacity.png``, ``noise.png``, ``kernel_steps.png`` and ``summary.json`` in the run directory.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .data import ImageSet, load_images
from .retriever import HopfieldRetriever, PolynomialRetriever, Retriever, UHopRetriever

__all__ = ["MODELS", "SweepConfig", "mask_pixels", "add_noise", "retrieval_errors", "run_sweep", "summarize", "plot_sweep"]


@dataclass
class SweepConfig:
    """Settings of :func:`run_sweep` (defaults: the small CLI sweep on digits, about a minute on 2 cores).

    Attributes:
        source, root, download: the images (see :func:`hopformer.retrieval.data.load_images`).
        seeds: number of seeds (independent memory sets and queries per setting).
        memory_sizes: memory-set sizes of the capacity sweep (paper: 10, 20, 30, 50, 100, 200, 500).
        mask_frac: fraction of pixels set to zero in the capacity queries (paper: 0.5).
        noise_levels: relative noise norms of the noise sweep (paper: 0 .. 2).
        noise_memory_size: memory-set size of the noise sweep.
        kernel_steps: stage-I step counts ``N`` of the stage-I sweep (paper: 1 .. 1000).
        uhop_steps: the ``N`` U-Hop uses in the capacity and noise comparisons.
        lr, t, loss, init: U-Hop stage-I options (:class:`UHopRetriever`).
        beta: inverse temperature of every model (paper: 1).
        update_steps: retrieval steps (paper: 1).
        models: names from :data:`MODELS`.
        pool_size: images loaded once, memory sets are drawn from them (``None``: enough for the sweep).
        device: torch device.
    """

    source: str = "digits"
    root: str | None = None
    download: bool = False
    seeds: int = 3
    memory_sizes: Sequence[int] = (10, 20, 50, 100, 200)
    mask_frac: float = 0.5
    noise_levels: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0)
    noise_memory_size: int = 100
    kernel_steps: Sequence[int] = (0, 1, 5, 10, 20, 50, 100, 200)
    uhop_steps: int = 100
    lr: float = 0.01
    t: float = 2.0
    loss: str = "average"
    init: str = "identity"
    beta: float = 1.0
    update_steps: int = 1
    models: Sequence[str] = field(default_factory=lambda: list(MODELS))
    pool_size: int | None = None
    device: str = "cpu"


def _uhop(dim: int, cfg: SweepConfig, separation: str = "softmax") -> UHopRetriever:
    return UHopRetriever(dim, separation=separation, beta=cfg.beta, t=cfg.t, kernel_steps=cfg.uhop_steps,
                         lr=cfg.lr, loss=cfg.loss, init=cfg.init)


# name -> (label for plots, factory(dim, cfg))
MODELS: dict[str, tuple[str, Callable[[int, SweepConfig], Retriever]]] = {
    "mhm": ("MHM (softmax)", lambda d, c: HopfieldRetriever(d, beta=c.beta)),
    "sparse": ("Sparse MHM (sparsemax)", lambda d, c: HopfieldRetriever(d, separation="sparsemax", beta=c.beta)),
    "entmax": ("GSH (1.5-entmax)", lambda d, c: HopfieldRetriever(d, separation="entmax15", beta=c.beta)),
    "dam": ("DAM (poly 10)", lambda d, c: PolynomialRetriever(d, degree=10)),
    "l2": ("L2 MHM", lambda d, c: HopfieldRetriever(d, similarity="l2", beta=c.beta)),
    "manhattan": ("Man. MHM", lambda d, c: HopfieldRetriever(d, similarity="manhattan", beta=c.beta)),
    "uhop": ("U-Hop + MHM", lambda d, c: _uhop(d, c)),
    "uhop_sparse": ("U-Hop + Sparse MHM", lambda d, c: _uhop(d, c, "sparsemax")),
}


def mask_pixels(images: Tensor, shape: Sequence[int], frac: float, generator: torch.Generator) -> Tensor:
    """Set ``floor(frac * H * W)`` random pixels (all channels) of each image to zero; kept pixels unchanged.

    Args:
        images: ``(n, C*H*W)`` flattened images.
        shape: ``(C, H, W)``.
        frac: fraction of pixels to zero, in [0, 1].
        generator: the random source (seeded by the caller).
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"mask_frac must be in [0, 1], got {frac!r}")
    c, h, w = shape
    n_masked = int(frac * h * w)
    ranks = torch.rand(images.shape[0], h * w, generator=generator).argsort(dim=-1).argsort(dim=-1)
    keep = rearrange((ranks >= n_masked).to(images.dtype), "n p -> n 1 p")
    pixels = rearrange(images, "n (c p) -> n c p", c=c)
    return rearrange(pixels * keep.to(images.device), "n c p -> n (c p)")


def add_noise(images: Tensor, level: float, generator: torch.Generator) -> Tensor:
    """``xi + n`` with Gaussian ``n`` rescaled to ``||n|| = level * ||xi||`` for each image."""
    if level < 0:
        raise ValueError(f"noise level must be >= 0, got {level!r}")
    noise = torch.randn(images.shape, generator=generator).to(images)
    scale = level * images.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return images + noise * scale


def retrieval_errors(retrieved: Tensor, memories: Tensor) -> dict[str, float]:
    """Sum-of-squares error per image (mean and std over the set) and the fraction retrieved correctly
    (the stored image nearest to the output is the target)."""
    sse = (retrieved - memories).square().sum(dim=-1)
    nearest = torch.cdist(retrieved, memories).argmin(dim=-1)
    correct = (nearest == torch.arange(memories.shape[0], device=memories.device)).float().mean()
    return {"error": sse.mean().item(), "error_std": sse.std().item() if sse.numel() > 1 else 0.0,
            "accuracy": correct.item()}


def _draw(pool: Tensor, size: int, rng: np.random.Generator) -> Tensor:
    if size > pool.shape[0]:
        raise ValueError(f"memory size {size} exceeds the {pool.shape[0]} images available")
    return pool[torch.from_numpy(rng.choice(pool.shape[0], size=size, replace=False))]


def _evaluate(models: dict[str, Retriever], queries: Tensor, memories: Tensor, steps: int) -> dict[str, dict]:
    results = {}
    for name, model in models.items():
        start = time.perf_counter()
        out = model.retrieve(queries, steps=steps)
        results[name] = {**retrieval_errors(out, memories), "seconds": time.perf_counter() - start}
    return results


def _fit_models(memories: Tensor, cfg: SweepConfig, kernel_steps: Sequence[int]):
    """Baselines fitted; U-Hop fitted once along its stage-I path. Returns (models at uhop_steps, uhop path)."""
    dim = memories.shape[-1]
    models, path = {}, {}
    uhop_names = [m for m in cfg.models if m.startswith("uhop")]
    for name in cfg.models:
        if name not in uhop_names:
            models[name] = MODELS[name][1](dim, cfg).fit(memories)
    if uhop_names:
        counts = sorted(set(kernel_steps) | {cfg.uhop_steps})
        path = MODELS["uhop"][1](dim, cfg).fit_path(memories, counts)
        for name in uhop_names:
            fitted = copy.copy(path[cfg.uhop_steps])
            fitted.separation = MODELS[name][1](dim, cfg).separation
            models[name] = fitted
    return models, path


def _uhop_losses(model: UHopRetriever) -> dict[str, float]:
    start = model.losses_[0].item() if model.losses_ is not None and len(model.losses_) else float("nan")
    return {"sep_loss_start": start, "sep_loss_end": model.separation_loss().item()}


def run_sweep(cfg: SweepConfig, progress: bool = True, images: ImageSet | None = None) -> list[dict]:
    """Run the capacity, noise and stage-I sweeps; one dict per (sweep, seed, setting, model)."""
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    if not isinstance(cfg.seeds, int) or cfg.seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {cfg.seeds!r}")
    need = max(list(cfg.memory_sizes) + [cfg.noise_memory_size])
    if images is None:
        images = load_images(cfg.source, cfg.root, n=cfg.pool_size or max(4 * need, 2000), seed=0, download=cfg.download)
    pool = images.images.to(cfg.device)
    base = {"source": images.name, "mask_frac": cfg.mask_frac, "beta": cfg.beta, "lr": cfg.lr}
    rows: list[dict] = []
    from tqdm.auto import tqdm

    total = cfg.seeds * (len(cfg.memory_sizes) + (1 if cfg.noise_levels else 0))
    bar = tqdm(total=total, desc=f"retrieval sweep ({images.name})", disable=not progress)
    for seed in range(cfg.seeds):
        for size in cfg.memory_sizes:
            rng, gen = np.random.default_rng([seed, size]), torch.Generator().manual_seed(seed * 100003 + size)
            memories = _draw(pool, size, rng)
            queries = mask_pixels(memories, images.shape, cfg.mask_frac, gen)
            models, path = _fit_models(memories, cfg, cfg.kernel_steps)
            common = {**base, "sweep": "capacity", "seed": seed, "memory_size": size, "noise_level": 0.0}
            for name, res in _evaluate(models, queries, memories, cfg.update_steps).items():
                steps = cfg.uhop_steps if name.startswith("uhop") else 0
                extra = _uhop_losses(models[name]) if name.startswith("uhop") else {}
                rows.append({**common, "model": name, "kernel_steps": steps, **res, **extra})
            for n in cfg.kernel_steps if path else ():
                res = _evaluate({"uhop": path[n]}, queries, memories, cfg.update_steps)["uhop"]
                rows.append({**common, "sweep": "kernel_steps", "model": "uhop", "kernel_steps": n, **res,
                             **_uhop_losses(path[n])})
            bar.update()
        if cfg.noise_levels:
            rng = np.random.default_rng([seed, 7919])
            memories = _draw(pool, cfg.noise_memory_size, rng)
            models, _ = _fit_models(memories, cfg, ())
            for level in cfg.noise_levels:
                gen = torch.Generator().manual_seed(seed * 100003 + int(level * 1000))
                queries = add_noise(memories, level, gen)
                common = {**base, "sweep": "noise", "seed": seed, "memory_size": cfg.noise_memory_size,
                          "noise_level": level}
                for name, res in _evaluate(models, queries, memories, cfg.update_steps).items():
                    steps = cfg.uhop_steps if name.startswith("uhop") else 0
                    rows.append({**common, "model": name, "kernel_steps": steps, **res})
            bar.update()
    bar.close()
    return rows


def summarize(rows: list[dict]):
    """Mean and std over seeds for every (source, sweep, memory size, noise level, model, N); a DataFrame."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    keys = ["source", "sweep", "memory_size", "noise_level", "model", "kernel_steps"]
    agg = frame.groupby(keys, as_index=False).agg(
        error_mean=("error", "mean"), error_std=("error", "std"), accuracy=("accuracy", "mean"),
        seeds=("seed", "nunique"),
    )
    return agg


def reduction_vs_mhm(summary) -> dict[str, float]:
    """Mean relative reduction of the one-step error, ``1 - err(model) / err(MHM)``, over the capacity settings."""
    cap = summary[summary.sweep == "capacity"]
    mhm = cap[cap.model == "mhm"].set_index("memory_size").error_mean
    out = {}
    for name in cap.model.unique():
        if name == "mhm" or mhm.empty:
            continue
        err = cap[cap.model == name].set_index("memory_size").error_mean
        out[name] = float((1.0 - err / mhm).dropna().mean())
    return out


def _errorbar(ax, x, group, label: str) -> None:
    """Mean +- std over seeds; the lower bar is cut at zero (errors are non-negative)."""
    std = group.error_std.fillna(0).to_numpy()
    mean = group.error_mean.to_numpy()
    ax.errorbar(x, mean, yerr=[np.minimum(std, mean), std], label=label, marker="o", capsize=2)


def plot_sweep(summary, out_dir: Path) -> list[Path]:
    """``capacity.png``, ``noise.png`` and ``kernel_steps.png`` (mean +- std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [("capacity", "memory_size", "memory set size", "capacity.png"),
              ("noise", "noise_level", "noise level ||n|| / ||xi||", "noise.png")]
    for sweep, x, xlabel, fname in panels:
        part = summary[summary.sweep == sweep]
        if part.empty:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, group in part.groupby("model"):
            group = group.sort_values(x)
            _errorbar(ax, group[x], group, label=MODELS[name][0])
        ax.set(xlabel=xlabel, ylabel="sum-of-squares error", title=f"{part.source.iloc[0]}: {sweep}",
               xscale="log" if sweep == "capacity" else "linear")
        ax.set_yscale("symlog", linthresh=1e-2)  # exact retrievals (error 0) stay visible
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(out_dir / fname)
    part = summary[summary.sweep == "kernel_steps"]
    if not part.empty:
        fig, ax = plt.subplots(figsize=(6, 4))
        for size, group in part.groupby("memory_size"):
            group = group.sort_values("kernel_steps")
            _errorbar(ax, group.kernel_steps.clip(lower=0.5), group, label=f"M = {size}")
        ax.set(xlabel="stage-I steps N (0 shown at 0.5)", ylabel="sum-of-squares error", xscale="log",
               title=f"{part.source.iloc[0]}: U-Hop error vs stage-I steps")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "kernel_steps.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "kernel_steps.png")
    return written


def write_run(rows: list[dict], cfg: SweepConfig, out_dir: Path) -> dict:
    """Write ``runs.csv``, ``summary.csv``, ``summary.json`` and the plots; return the summary dict."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "runs.csv", index=False)
    summary = summarize(rows)
    summary.to_csv(out_dir / "summary.csv", index=False)
    info = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            "mean_reduction_vs_mhm": reduction_vs_mhm(summary),
            "plots": [p.name for p in plot_sweep(summary, out_dir)]}
    (out_dir / "summary.json").write_text(json.dumps(info, indent=2))
    return info
