"""``python -m hopformer.retrieval`` / ``hopformer-retrieval``: the U-Hop memory-retrieval sweeps (Fig. 3, 5).

Examples::

    hopformer-retrieval                                   # small sweep on scikit-learn digits (~1-2 min, 2 cores)
    hopformer-retrieval --data folder --root ../shared/data/cifar10/train --memory-sizes 10 20 50 100
    hopformer-retrieval --data mnist --root ~/data --paper  # the paper's grid (hours on a CPU)

Output: ``runs/retrieval/<name>/`` (``--name``, default ``<data>-<timestamp>``; ``--out`` for any other
folder), printed at the start and the end: ``runs.csv``, ``summary.csv``, ``summary.json``, plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..experiments.reporting import RunReport, print_table, run_folder
from .data import SOURCES
from .experiments import MODELS, SweepConfig, run_sweep, write_run

EXPECTED_TIME = ("Expected time: about 1-2 minutes with the defaults (digits) on 1-2 CPU cores; about 4 minutes for "
                 "5 seeds of CIFAR-10 images (--data folder); --paper takes hours (run it under flock "
                 "/tmp/hopformer-heavy.lock on a shared machine).")

PAPER_GRID = {
    "memory_sizes": [10, 20, 30, 50, 100, 200, 500],
    "noise_levels": [0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 1.2, 1.4, 2.0],
    "kernel_steps": [0, 1, 10, 20, 50, 100, 200, 500, 1000],
    "seeds": 20,
}


def build_parser() -> argparse.ArgumentParser:
    defaults = SweepConfig()
    p = argparse.ArgumentParser(prog="hopformer-retrieval", description=__doc__.split("\n\n")[0],
                                epilog=EXPECTED_TIME, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=SOURCES, default=defaults.source, help="image source")
    p.add_argument("--root", default=None, help="torchvision data directory, or the ImageFolder directory for --data folder")
    p.add_argument("--download", action="store_true", help="let torchvision download MNIST / CIFAR-10")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/retrieval/<name>)")
    p.add_argument("--name", default=None, help="run name, the last part of runs/retrieval/<name> "
                   "(default: <data>-<timestamp>)")
    p.add_argument("--seeds", type=int, default=defaults.seeds, help="independent memory sets and queries per setting")
    p.add_argument("--memory-sizes", type=int, nargs="+", default=list(defaults.memory_sizes),
                   help="memory-set sizes of the capacity sweep")
    p.add_argument("--mask-frac", type=float, default=defaults.mask_frac,
                   help="fraction of pixels set to zero in the capacity queries")
    p.add_argument("--noise-levels", type=float, nargs="*", default=list(defaults.noise_levels),
                   help="relative noise norms ||n|| / ||xi||; none skips the noise sweep")
    p.add_argument("--noise-memory-size", type=int, default=defaults.noise_memory_size,
                   help="memory-set size of the noise sweep")
    p.add_argument("--kernel-steps", type=int, nargs="*", default=list(defaults.kernel_steps),
                   help="stage-I step counts N of the stage-I sweep")
    p.add_argument("--uhop-steps", type=int, default=defaults.uhop_steps, help="N used in the model comparison")
    p.add_argument("--lr", type=float, default=defaults.lr, help="U-Hop stage-I SGD learning rate")
    p.add_argument("--t", type=float, default=defaults.t, help="separation-loss scale t")
    p.add_argument("--loss", choices=("average", "orthogonal", "max"), default=defaults.loss,
                   help="U-Hop separation loss of stage I")
    p.add_argument("--init", choices=("identity", "orthogonal", "gaussian"), default=defaults.init,
                   help="initialisation of U-Hop's feature map")
    p.add_argument("--beta", type=float, default=defaults.beta, help="inverse temperature of every model")
    p.add_argument("--update-steps", type=int, default=defaults.update_steps, help="retrieval steps of every model")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models compared")
    p.add_argument("--pool-size", type=int, default=None, help="images loaded once (memory sets are drawn from them)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is "
                   "fastest on a machine shared with other jobs)")
    p.add_argument("--paper", action="store_true", help="the paper's grid: sizes 10..500, 11 noise levels, N up to 1000, "
                   "20 seeds (heavy: run under flock /tmp/hopformer-heavy.lock on shared machines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
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
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    name = args.name or f"{args.data}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = args.out or Path("runs") / "retrieval" / name
    report = RunReport("retrieval", out)  # the folder is created when there are results to write
    try:
        rows = run_sweep(cfg, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"hopformer-retrieval: error: {err}", file=sys.stderr)
        return 2
    info = write_run(rows, cfg, run_folder("retrieval", out=out))
    _print_results(rows, info)
    report.finish(info["config"], {"mean_reduction_vs_mhm": info["mean_reduction_vs_mhm"], "runs": len(rows)},
                  {"plots": info["plots"]})
    return 0


def _print_results(rows: list[dict], info: dict) -> None:
    """The capacity and noise sweeps as tables (mean one-step error over seeds), then the gain over MHM."""
    from .experiments import summarize

    summary = summarize(rows)
    for sweep, key, title in (("capacity", "memory_size", "capacity sweep: one-step error (mean over seeds)"),
                              ("noise", "noise_level", "noise sweep: one-step error (mean over seeds)")):
        part = summary[(summary.sweep == sweep)]
        if part.empty:
            continue
        table = part.pivot_table(index=key, columns="model", values="error_mean").reset_index()
        print_table([{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in table.to_dict("records")],
                    title)
    gains = sorted(info["mean_reduction_vs_mhm"].items(), key=lambda kv: -kv[1])
    print_table([{"model": MODELS[name][0], "error vs MHM (%)": -100.0 * value} for name, value in gains],
                "one-step error relative to MHM, mean over memory sizes (negative: lower error)", digits=3)


if __name__ == "__main__":
    raise SystemExit(main())
