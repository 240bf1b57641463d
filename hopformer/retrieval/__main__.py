"""``python -m hopformer.retrieval`` / ``hopformer-retrieval``: the U-Hop memory-retrieval sweeps (Fig. 3, 5).

Examples::

    hopformer-retrieval                                   # small sweep on scikit-learn digits (~1-2 min, 2 cores)
    hopformer-retrieval --data folder --root ../shared/data/cifar10/train --memory-sizes 10 20 50 100
    hopformer-retrieval --data mnist --root ~/data --paper  # the paper's grid (hours on a CPU)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .data import SOURCES
from .experiments import MODELS, SweepConfig, run_sweep, write_run

PAPER_GRID = {
    "memory_sizes": [10, 20, 30, 50, 100, 200, 500],
    "noise_levels": [0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 1.2, 1.4, 2.0],
    "kernel_steps": [0, 1, 10, 20, 50, 100, 200, 500, 1000],
    "seeds": 20,
}


def build_parser() -> argparse.ArgumentParser:
    defaults = SweepConfig()
    p = argparse.ArgumentParser(prog="hopformer-retrieval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=SOURCES, default=defaults.source, help="image source")
    p.add_argument("--root", default=None, help="torchvision data directory, or the ImageFolder directory for --data folder")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST / CIFAR-10")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/retrieval/<data>-<time>)")
    p.add_argument("--seeds", type=int, default=defaults.seeds)
    p.add_argument("--memory-sizes", type=int, nargs="+", default=list(defaults.memory_sizes))
    p.add_argument("--mask-frac", type=float, default=defaults.mask_frac)
    p.add_argument("--noise-levels", type=float, nargs="*", default=list(defaults.noise_levels),
                   help="relative noise norms ||n|| / ||xi||; none skips the noise sweep")
    p.add_argument("--noise-memory-size", type=int, default=defaults.noise_memory_size)
    p.add_argument("--kernel-steps", type=int, nargs="*", default=list(defaults.kernel_steps),
                   help="stage-I step counts N of the stage-I sweep")
    p.add_argument("--uhop-steps", type=int, default=defaults.uhop_steps, help="N used in the model comparison")
    p.add_argument("--lr", type=float, default=defaults.lr, help="U-Hop stage-I SGD learning rate")
    p.add_argument("--t", type=float, default=defaults.t, help="separation-loss scale t")
    p.add_argument("--loss", choices=("average", "orthogonal", "max"), default=defaults.loss)
    p.add_argument("--init", choices=("identity", "orthogonal", "gaussian"), default=defaults.init)
    p.add_argument("--beta", type=float, default=defaults.beta)
    p.add_argument("--update-steps", type=int, default=defaults.update_steps)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--pool-size", type=int, default=None, help="images loaded once (memory sets are drawn from them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--paper", action="store_true", help="the paper's grid: sizes 10..500, 11 noise levels, N up to 1000, "
                   "20 seeds (heavy: run under flock /tmp/hopformer-heavy.lock on shared machines)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = SweepConfig(
        source=args.data, root=args.root, download=args.download, seeds=args.seeds, memory_sizes=args.memory_sizes,
        mask_frac=args.mask_frac, noise_levels=args.noise_levels, noise_memory_size=args.noise_memory_size,
        kernel_steps=args.kernel_steps, uhop_steps=args.uhop_steps, lr=args.lr, t=args.t, loss=args.loss,
        init=args.init, beta=args.beta, update_steps=args.update_steps, models=args.models,
        pool_size=args.pool_size, device=args.device,
    )
    if args.paper:
        for key, value in PAPER_GRID.items():
            setattr(cfg, key, value)
    out = args.out or Path("runs") / "retrieval" / f"{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        rows = run_sweep(cfg, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"hopformer-retrieval: error: {err}", file=sys.stderr)
        return 2
    info = write_run(rows, cfg, out)
    print(f"wrote {len(rows)} runs to {out}/runs.csv (summary.csv, {', '.join(info['plots'])})")
    for name, value in sorted(info["mean_reduction_vs_mhm"].items(), key=lambda kv: -kv[1]):
        print(f"  {MODELS[name][0]:<24s} one-step error vs MHM, mean over memory sizes: {-100 * value:+.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
