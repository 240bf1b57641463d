"""Run folders ``<root>/version_<n>``: claimed atomically, and kept when a run is resumed.

Lightning's loggers pick ``version_<n>`` as "one more than the largest existing folder" and create it
only when they first write, so two runs started at the same time into the same root can pick the
same folder (interleaved ``metrics.csv``, one run's checkpoints lost). :func:`claim_version` creates
the folder with ``os.makedirs(exist_ok=False)`` and moves on to the next number when another run got
there first, so each run owns its folder before anything is written.

A run resumed from ``<root>/version_<n>/checkpoints/last.ckpt`` continues in ``version_<n>``
(:func:`version_of_checkpoint`), so ``ModelCheckpoint`` finds its own ``dirpath`` in the checkpoint
and reloads the best path and score; :class:`AppendingCSVLogger` then appends to the run's
``metrics.csv`` instead of deleting it.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["claim_version", "version_of_checkpoint", "AppendingCSVLogger"]

_VERSION = re.compile(r"version_(\d+)")


def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name)) and p.is_dir()]


def claim_version(root: str | os.PathLike, attempts: int = 1000) -> int:
    """Create ``<root>/version_<n>`` for the smallest free ``n`` above the existing ones and return ``n``.

    The folder is created with ``exist_ok=False``: of several processes claiming at the same time,
    each gets a different ``n``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = max(_versions(root), default=-1) + 1
    for _ in range(attempts):
        try:
            (root / f"version_{n}").mkdir(exist_ok=False)
            return n
        except FileExistsError:
            n += 1
    raise RuntimeError(f"could not claim a run folder version_<n> under '{root}' after {attempts} attempts")


def version_of_checkpoint(ckpt_path: str | os.PathLike | None, root: str | os.PathLike) -> int | None:
    """``n`` when ``ckpt_path`` is ``<root>/version_<n>/checkpoints/<file>`` (a run to resume in place), else None."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path).resolve()
    run = path.parent.parent
    match = _VERSION.fullmatch(run.name)
    if path.parent.name != "checkpoints" or match is None or run.parent != Path(root).resolve():
        return None
    return int(match.group(1))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without the "previous log files will be deleted" step: a resumed run appends."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):  # keep the columns already written
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` (a resumed run) instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
