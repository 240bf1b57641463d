"""A plain-text progress bar for runs whose output is not a terminal (nohup, SLURM, CI, ``> log.txt``).

Lightning's rich bar prints nothing until the end when stdout is not a TTY, and tqdm's bar floods a
log with carriage returns. :class:`PlainProgressBar` prints one self-contained line at a time instead::

    [fit] epoch 3/30  step 45/600 (7.5%)  12.3 it/s  787 samples/s  elapsed 0:00:04  ETA 0:00:45  train_loss 0.512  val_acc 0.871

The first line comes after the first training batch, then one line every ``interval`` seconds
during training (and evaluation/prediction loops longer than ``interval``), one line after each
validation run, and a closing line with the totals. ``hopformer.cli`` uses it instead of the rich
bar when ``sys.stdout.isatty()`` is false. Set it yourself (e.g. another interval) with
``--trainer.callbacks+=hopformer.training.PlainProgressBar --trainer.callbacks.interval 10``.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.data import extract_batch_size

__all__ = ["PlainProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown or infinite)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(timedelta(seconds=int(round(seconds))))


def _format_value(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}"


class PlainProgressBar(ProgressBar):
    """Print progress as plain lines at most every ``interval`` seconds (a Lightning ``ProgressBar``).

    Args:
        interval: seconds between two lines within a loop (> 0).
        stream: where to print (default ``sys.stdout``, looked up at each print); lines are flushed.
    """

    def __init__(self, interval: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        if not interval > 0:
            raise ValueError(f"interval={interval!r}: expected a positive number of seconds")
        self.interval = float(interval)
        self._stream = stream
        self._enabled = True
        self._fit_start = 0.0
        self._last_line = 0.0
        self._loop_start = 0.0
        self._steps_done = 0
        self._samples_done = 0
        self._total: float | None = None

    # ---------------------------------------------------------------- ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self._stream or sys.stdout, flush=True, **kwargs)

    # ---------------------------------------------------------------- helpers
    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return "  ".join(f"{k} {_format_value(v)}" for k, v in items.items())

    def _total_steps(self, trainer: L.Trainer) -> float:
        if self._total is None:  # once per fit: Lightning may load the train dataloader to estimate it
            total = trainer.estimated_stepping_batches
            self._total = float(total) if total is not None else math.inf
        return self._total

    def _train_line(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str = "fit") -> str:
        now = time.monotonic()
        elapsed = max(now - self._fit_start, 1e-9)
        step = trainer.global_step
        total = self._total_steps(trainer)
        rate = self._steps_done / elapsed
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        parts = [f"[{prefix}] epoch {trainer.current_epoch + 1}/{epochs}"]
        if math.isfinite(total) and total > 0:
            parts.append(f"step {step}/{int(total)} ({100.0 * step / total:.1f}%)")
        else:
            parts.append(f"step {step}")
        parts.append(f"{rate:.3g} it/s")
        if self._samples_done:
            parts.append(f"{self._samples_done / elapsed:.4g} samples/s")
        remaining = (total - step) / rate if rate > 0 and math.isfinite(total) else math.inf
        parts.append(f"elapsed {format_duration(elapsed)}  ETA {format_duration(remaining)}")
        metrics = self._metrics(trainer, pl_module)
        return "  ".join(parts + ([metrics] if metrics else []))

    def _eval_line(self, stage: str, batch_idx: int, total: float) -> str:
        elapsed = max(time.monotonic() - self._loop_start, 1e-9)
        done = batch_idx + 1
        rate = done / elapsed
        of = f"/{int(total)}" if math.isfinite(total) else ""
        remaining = (total - done) / rate if math.isfinite(total) else math.inf
        return (f"[{stage}] batch {done}{of}  {rate:.3g} it/s  elapsed {format_duration(elapsed)}  "
                f"ETA {format_duration(remaining)}")

    def _due(self) -> bool:
        return time.monotonic() - self._last_line >= self.interval

    def _emit(self, line: str) -> None:
        self._last_line = time.monotonic()
        self.print(line)

    # ---------------------------------------------------------------- training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.monotonic()
        self._steps_done = self._samples_done = 0
        self._total = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps_done += 1
        try:
            self._samples_done += extract_batch_size(batch)
        except Exception:  # noqa: BLE001 - batches without a tensor: no samples/s
            pass
        if self._steps_done == 1 or self._due():
            self._emit(self._train_line(trainer, pl_module))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loop_start = time.monotonic()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due() and not trainer.sanity_checking:
            self._current_eval_dataloader_idx = dataloader_idx
            self._emit(self._eval_line("validate", batch_idx, self.total_val_batches_current_dataloader))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._emit(self._train_line(trainer, pl_module, prefix="fit: validated"))
        else:
            self._emit(f"[validate] done in {format_duration(time.monotonic() - self._loop_start)}  "
                       f"{self._metrics(trainer, pl_module)}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.monotonic() - self._fit_start
        self._emit(f"[fit] done: {trainer.current_epoch} epochs, {trainer.global_step} steps in "
                   f"{format_duration(elapsed)} ({self._steps_done / max(elapsed, 1e-9):.3g} it/s)  "
                   f"{self._metrics(trainer, pl_module)}")

    # ---------------------------------------------------------------- test and predict
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loop_start = time.monotonic()

    on_predict_start = on_test_start

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due():
            self._current_eval_dataloader_idx = dataloader_idx
            self._emit(self._eval_line("test", batch_idx, self.total_test_batches_current_dataloader))

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due():
            self._current_eval_dataloader_idx = dataloader_idx
            self._emit(self._eval_line("predict", batch_idx, self.total_predict_batches_current_dataloader))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(f"[test] done in {format_duration(time.monotonic() - self._loop_start)}")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(f"[predict] done in {format_duration(time.monotonic() - self._loop_start)}")
