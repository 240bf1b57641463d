"""Runnable experiments (``python -m hopformer.experiments.<name>``), each writing CSV tables and PNG plots.

* ``continuous_memory``: continuous-time vs discrete memories (Santos et al. 2025, Sections 5.1-5.3).
* ``sequence_memory``: the temporal-kernel sequence memory on movies of real images (Farooq 2025).

Data: ``--data-dir`` (default ``../shared/data`` beside the repository when it exists); every
experiment falls back to generated data when the real data are absent.
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
    """The options every experiment takes: data folder, output root, seed and torch threads."""
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def run_dir(root: str | Path, name: str) -> Path:
    """A fresh run folder ``root/name-YYYYmmdd-HHMMSS``."""
    import time

    path = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path
