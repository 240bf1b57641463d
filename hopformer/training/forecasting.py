"""Forecasting LightningModule for STanHop-Net and the baselines (training protocol of Crossformer, Zhang & Yan 2023, as used by STanHop, Wu et al. 2024).

MSE loss; MSE/MAE (torchmetrics) on the normalised scale (as the papers report) and optionally on the
original scale; Crossformer's ``type1`` step decay; test metrics (JSON + CSV) and a prediction plot
(PNG) written to the run directory. Gradient clipping (5) and early stopping on ``val_mse`` are
trainer settings (``gradient_clip_val: 5``, ``EarlyStopping(monitor="val_mse")``) in the configs.

Batches are dicts from :class:`hopformer.data.TimeSeriesDataModule`: ``x`` ``(B, L, C)``, ``y``
``(B, H, C_out)``; when ``C_out < C`` (features "MS") the last ``C_out`` predicted series are scored.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from .checkpoint_file import read_checkpoint

__all__ = ["ForecastingModule", "crossformer_type1_factor", "plot_forecasts"]


def crossformer_type1_factor(epoch: int) -> float:
    """Crossformer's ``adjust_learning_rate`` ``type1``: lr halves after epochs 2, 4, 6, 8 and 10.

    ``epoch`` counts from 0 (the epoch about to run): epochs 0-1 use lr, 2-3 lr/2, ..., 10+ lr/32.
    (Informer's ``type1`` halves after every epoch from the second on: ``lr_schedule="halving"``.)
    """
    return 0.5 ** min(epoch // 2, 5)


def _metrics(prefix: str) -> MetricCollection:
    return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}, prefix=prefix)


class ForecastingModule(L.LightningModule):
    """Train and evaluate a forecaster ``(B, L, C) -> (B, H, C)``.

    Args:
        model: the forecaster (``hopformer.models.STanHopNet``, ``DLinear``, ``RepeatLast``, ...).
        lr: Adam learning rate (paper: 1e-4).
        weight_decay: Adam weight decay.
        lr_schedule: "type1" (Crossformer step decay), "halving" (Informer type1) or "none".
        original_scale_metrics: also report test MSE/MAE after undoing the data module's scaling.
        memory_windows: training windows offered to the model's memory plugins (``fill_memory``).
        train_memory_only: train only the memory plugins (Tune-and-Play on a frozen backbone).
        init_checkpoint: optional Lightning checkpoint whose weights initialise the module
            (non-strict: memory buffers absent from it keep their values).
        plot_windows: test windows drawn in ``predictions.png`` (0: no plot).
        plot_series: index of the series to plot (default -1: the target column).
        seed: seed of the memory-window draw.
        compile: wrap the model's forward in ``torch.compile`` (``nn.Module.compile``: parameter names
            and checkpoints unchanged); see ``docs/performance.md``.
    """

    monitor = "val_mse"  # read by hopformer.cli for ModelCheckpoint
    monitor_mode = "min"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["type1", "halving", "none"] = "type1",
        original_scale_metrics: bool = True,
        memory_windows: int = 256,
        train_memory_only: bool = False,
        init_checkpoint: str | None = None,
        plot_windows: int = 4,
        plot_series: int = -1,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("type1", "halving", "none"):
            raise ValueError(f"lr_schedule={lr_schedule!r}: expected 'type1', 'halving' or 'none'")
        if not lr > 0:
            raise ValueError(f"lr={lr!r}: expected a positive learning rate")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.val_metrics, self.test_metrics = _metrics("val_"), _metrics("test_")
        self.test_original = _metrics("test_orig_")
        self.target_mean: Tensor | None = None
        self.target_std: Tensor | None = None
        self.epoch_times: list[float] = []
        self._epoch_start = 0.0
        self.strict_loading = getattr(model, "memory_kind", None) is None
        if train_memory_only:
            for name, p in self.model.named_parameters():
                p.requires_grad_(".memory." in f".{name}")
        if init_checkpoint is not None:
            state = read_checkpoint(init_checkpoint, "init_checkpoint")["state_dict"]
            try:
                result = self.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise ValueError(f"init_checkpoint={init_checkpoint!r} does not fit this model: {err}") from None
            missing = [k for k in result.missing_keys if ".memory." not in k]
            if missing or result.unexpected_keys:
                raise ValueError(f"init_checkpoint={init_checkpoint!r} does not fit this model: missing "
                                 f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        if compile:
            self.model.compile()

    # ------------------------------------------------------------------ model
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def memory_forward(self, batch: dict[str, Tensor]) -> Tensor:
        """No-grad forward used by the U-Hop two-stage callback to collect the memories of each layer."""
        return self.model(batch["x"])

    @staticmethod
    def _align(pred: Tensor, y: Tensor) -> Tensor:
        if pred.shape[-1] != y.shape[-1]:  # "MS": the target is the last column
            pred = pred[..., -y.shape[-1] :]
        if pred.shape != y.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} does not match target {tuple(y.shape)}")
        return pred.contiguous()

    def _predict(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self._align(self.model(batch["x"]), batch["y"]), batch["y"]

    # ------------------------------------------------------------------ setup and memory
    def check_datamodule(self, datamodule) -> None:
        """Fail before training when the model's series count or lengths disagree with the data."""
        if datamodule is None or not hasattr(datamodule, "num_series"):
            return
        for attr, data_attr in (("num_series", "num_series"), ("input_len", "input_len"), ("horizon", "horizon")):
            mine, theirs = getattr(self.model, attr, None), getattr(datamodule, data_attr, None)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"model {attr}={mine} but the data module has {data_attr}={theirs}"
                                 + (f" (columns {datamodule.columns})" if attr == "num_series" else ""))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "target_scale"):
            dm.setup(stage)
            self.check_datamodule(dm)
            mean, std = dm.target_scale()
            self.target_mean, self.target_std = mean.to(self.device), std.to(self.device)

    def fill_memory(self) -> None:
        """Offer ``memory_windows`` seeded random training windows to the model's memory plugins."""
        if getattr(self.model, "memory_kind", None) is None:
            return
        dm = self.trainer.datamodule
        train = dm.datasets["train"]
        gen = torch.Generator().manual_seed(self.hparams.seed)
        index = torch.randperm(len(train), generator=gen)[: self.hparams.memory_windows]
        windows = torch.stack([train[int(i)]["x"] for i in index]).to(self.device)
        self.model.fill_memory(windows)

    def on_fit_start(self) -> None:
        if getattr(self.model, "memory_kind", None) == "tune":
            self.fill_memory()  # data initialisation of the learned patterns, once

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        if getattr(self.model, "memory_kind", None) == "plug":
            self.fill_memory()  # refresh the train-less bank with the current representations

    def on_train_epoch_end(self) -> None:
        self.epoch_times.append(time.perf_counter() - self._epoch_start)
        self.log("epoch_time_s", self.epoch_times[-1])

    def on_test_start(self) -> None:
        if getattr(self.model, "memory_kind", None) == "plug":
            self.fill_memory()

    on_validation_start = on_test_start

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        pred, y = self._predict(batch)
        loss = F.mse_loss(pred, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {self.global_step}")
        self.log("train_loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        pred, y = self._predict(batch)
        self.val_metrics.update(pred, y)
        self.log_dict(self.val_metrics, prog_bar=True, batch_size=y.shape[0])

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """The forecast ``(B, H, C_out)``, and in the data's units when the scaler is known (``predict`` saves both)."""
        pred = self._align(self.model(batch["x"]), batch["y"]) if "y" in batch else self.model(batch["x"])
        out = {"forecast": pred}
        if self.target_mean is not None:
            out["forecast_original_scale"] = pred * self.target_std.to(pred) + self.target_mean.to(pred)
        return out

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        pred, y = self._predict(batch)
        self.test_metrics.update(pred, y)
        self.log_dict(self.test_metrics, batch_size=y.shape[0])
        if self.hparams.original_scale_metrics and self.target_mean is not None:
            mean, std = self.target_mean.to(pred), self.target_std.to(pred)
            self.test_original.update(pred * std + mean, y * std + mean)
            self.log_dict(self.test_original, batch_size=y.shape[0])

    def on_test_epoch_end(self) -> None:
        # compute() syncs across ranks under DDP: every rank calls it, only rank 0 writes
        results = {k: float(v) for k, v in self.test_metrics.compute().items()}
        if self.hparams.original_scale_metrics and self.target_mean is not None:
            results.update({k: float(v) for k, v in self.test_original.compute().items()})
        if self.global_rank != 0:
            return
        if self.epoch_times:
            results["epoch_time_s_mean"] = sum(self.epoch_times) / len(self.epoch_times)
            results["epochs"] = len(self.epoch_times)
        results["model"] = type(self.model).__name__
        results["trainable_parameters"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        run_dir = self.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "test_metrics.json").write_text(json.dumps(results, indent=2))
        with open(run_dir / "test_metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(results.keys())
            writer.writerow(results.values())
        if self.hparams.plot_windows > 0 and getattr(self.trainer, "datamodule", None) is not None:
            plot_forecasts(self, self.trainer.datamodule.datasets["test"], run_dir / "predictions.png",
                           self.hparams.plot_windows, self.hparams.plot_series)

    def run_dir(self) -> Path:
        """The logger's directory when there is one, else the trainer's ``default_root_dir``."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return None  # e.g. RepeatLast: nothing to train
        opt = torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "none":
            return opt
        factor = crossformer_type1_factor if self.hparams.lr_schedule == "type1" else (lambda e: 0.5 ** max(e - 1, 0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


@torch.no_grad()
def plot_forecasts(module: L.LightningModule, dataset, path: Path, num_windows: int = 4, series: int = -1) -> None:
    """Save a PNG with history, truth and forecast of ``series`` for evenly spaced test windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = torch.linspace(0, len(dataset) - 1, num_windows).long().tolist()
    items = [dataset[i] for i in index]
    x = torch.stack([it["x"] for it in items]).to(module.device)
    y = torch.stack([it["y"] for it in items])
    was_training = module.training
    module.eval()
    pred = module._align(module(x), y.to(module.device)).cpu()
    module.train(was_training)
    names = list(getattr(getattr(module.trainer, "datamodule", None), "columns", []) or [])
    fig, axes = plt.subplots(num_windows, 1, figsize=(9, 2.2 * num_windows), squeeze=False)
    hist_t = torch.arange(-x.shape[1], 0)
    fut_t = torch.arange(0, y.shape[1])
    for ax, i, xi, yi, pi in zip(axes[:, 0], index, x.cpu(), y, pred):
        ax.plot(hist_t, xi[:, series], color="0.4", lw=1, label="history")
        ax.plot(fut_t, yi[:, series], color="tab:blue", lw=1, label="truth")
        ax.plot(fut_t, pi[:, series], color="tab:red", lw=1, label="forecast")
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_title(f"test window {i}, series {names[series]}" if names else f"test window {i}", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("time step relative to forecast start (normalised scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
