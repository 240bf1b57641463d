"""Write the outputs of ``python train.py predict ...`` to the run folder (a Lightning ``BasePredictionWriter``).

What is written depends on what the module's ``predict_step`` returns:

- classification (``{"class": (B,), "probabilities": (B, K)}``): ``predictions.csv`` with the columns
  ``index, class, prob_0 .. prob_{K-1}``;
- forecasting (``{"forecast": (B, H, C)}``, optionally ``"forecast_original_scale"``): ``forecast.npy``
  (windows x horizon x series, the model's normalised scale), ``forecast_original_scale.npy`` when the
  data scaler is known, and ``predictions.csv`` in long form (``window, step, series_0 ..``, original
  scale when known);
- any other tensor: ``predictions.npy`` (batches concatenated) and, for 1-D/2-D outputs, ``predictions.csv``.

The folder is ``output_dir`` or the logger's run folder (``trainer.log_dir``); under DDP each rank
writes its own files with a ``-rank<r>`` suffix. ``hopformer.cli`` adds this callback to ``predict``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

__all__ = ["PredictionWriter"]


def _cat(outputs: Sequence[Any], key: str | None = None) -> np.ndarray:
    parts = [(o[key] if key is not None else o) for o in outputs]
    return torch.cat([torch.as_tensor(p).detach().cpu() for p in parts]).numpy()


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


class PredictionWriter(BasePredictionWriter):
    """Save predictions (class + probabilities, or the forecast) under the run folder and print where.

    Args:
        output_dir: folder for the files (default: the logger's run folder, else ``default_root_dir``).
        write_interval: only ``"epoch"`` (all predictions of a ``predict`` call in one file).
    """

    def __init__(self, output_dir: str | None = None, write_interval: Literal["epoch"] = "epoch") -> None:
        if write_interval != "epoch":
            raise ValueError(f"write_interval={write_interval!r}: PredictionWriter writes once per predict call ('epoch')")
        super().__init__(write_interval)
        self.output_dir = output_dir
        self.written: list[Path] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if not predictions:
            return
        # one dataloader: a list of batch outputs; several: a list of such lists
        nested = isinstance(predictions[0], list)
        groups = list(predictions) if nested else [predictions]
        folder = self._folder(trainer)
        suffix = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.written = []
        for index, outputs in enumerate(groups):
            if not outputs:
                continue
            tag = suffix + (f"-dataloader{index}" if len(groups) > 1 else "")
            self.written += self._write(folder, tag, outputs)
        for path in self.written:
            print(f"predictions written to {path}", flush=True)

    def _write(self, folder: Path, tag: str, outputs: Sequence[Any]) -> list[Path]:
        first = outputs[0]
        if isinstance(first, Mapping) and "probabilities" in first:
            probs = _cat(outputs, "probabilities")
            classes = _cat(outputs, "class") if "class" in first else probs.argmax(-1)
            path = folder / f"predictions{tag}.csv"
            header = ["index", "class", *(f"prob_{k}" for k in range(probs.shape[1]))]
            _write_csv(path, header, ([i, int(c), *(f"{p:.6g}" for p in row)]
                                      for i, (c, row) in enumerate(zip(classes, probs))))
            return [path]
        if isinstance(first, Mapping) and "forecast" in first:
            written = []
            forecast = _cat(outputs, "forecast")
            np.save(folder / f"forecast{tag}.npy", forecast)
            written.append(folder / f"forecast{tag}.npy")
            if "forecast_original_scale" in first:
                forecast = _cat(outputs, "forecast_original_scale")
                np.save(folder / f"forecast_original_scale{tag}.npy", forecast)
                written.append(folder / f"forecast_original_scale{tag}.npy")
            windows, horizon, series = forecast.shape
            path = folder / f"predictions{tag}.csv"
            _write_csv(path, ["window", "step", *(f"series_{c}" for c in range(series))],
                       ([w, h, *(f"{v:.6g}" for v in forecast[w, h])] for w in range(windows) for h in range(horizon)))
            return [*written, path]
        if isinstance(first, Tensor):
            values = _cat(outputs)
            path = folder / f"predictions{tag}.npy"
            np.save(path, values)
            written = [path]
            if values.ndim in (1, 2):
                table = values.reshape(len(values), -1)
                csv_path = folder / f"predictions{tag}.csv"
                _write_csv(csv_path, ["index", *(f"output_{k}" for k in range(table.shape[1]))],
                           ([i, *(f"{v:.6g}" for v in row)] for i, row in enumerate(table)))
                written.append(csv_path)
            return written
        raise TypeError(f"predict_step returned {type(first).__name__}: expected a tensor or a dict with "
                        "'probabilities' (classification) or 'forecast' (forecasting)")
