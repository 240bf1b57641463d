"""Runnable experiments (``python -m hopformer.experiments.<name>``), each writing CSV tables and PNG plots.

* ``continuous_memory``: continuous-time vs discrete memories (Santos et al. 2025, Sections 5.1-5.3).
* ``sequence_memory``: the temporal-kernel sequence memory on movies of real images (Farooq 2025).

Data: ``--data-dir`` (default ``../shared/data`` beside the repository when it exists); every
experiment falls back to generated data when the real data are absent. Output: one folder per run,
``runs/<job>/<name>/`` (``--name``, default a timestamp; ``--out`` for any other folder), printed at
the start and the end, with CSV tables, PNG plots and one ``summary.json``
(:mod:`hopformer.experiments.reporting`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_common_arguments", "default_data_dir", "run_dir"]


def default_data_dir() -> Path | None:
    """``../shared/data`` beside the repository if it exists, else ``None`` (use generated data)."""
    candidate = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every experiment takes: data folder, run folder and name, seed, torch threads, progress."""
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="folder holding cifar10/train and ett/ETTh1.csv (default: ../shared/data beside the "
                             "repository when it exists); data not found there is replaced by generated data")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<job>/<name>)")
    parser.add_argument("--name", default=None, help="run name, the last part of runs/<job>/<name> (default: a timestamp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data, the noise and the picks")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a machine shared with other jobs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")


def run_dir(job: str, args: argparse.Namespace) -> Path:
    """The run folder ``args.out`` or ``runs/<job>/<args.name or timestamp>`` (created)."""
    from .reporting import run_folder

    return run_folder(job, getattr(args, "name", None), getattr(args, "out", None))
