"""Image-classification LightningModule for Hopfield ViTs and ViH (stage II of U-Hop's Algorithm 2).

The module is an ordinary Lightning module (automatic optimisation: AdamW by default, cosine
schedule with linear warm-up). Add :class:`hopformer.training.UHopSeparation` to the trainer's
callbacks for the two-stage U-Hop optimisation: the callback runs stage I before each step and this
module's optimizer performs stage II on all parameters. Without U-Hop layers (or without the
callback) training is the usual single stage.

Logged: ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc``
(torchmetrics), and the learnable ``alpha`` / ``beta`` of Hopfield layers (``hopfield/<layer>/alpha``).
The learning rate is logged by ``LearningRateMonitor`` (added by ``train.py``).
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from typing import Any, Literal, Mapping

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.models import get_model_input_config
from torchmetrics.classification import MulticlassAccuracy

from .. import models as _models  # noqa: F401  (registers the Hopfield ViTs and ViH with timm)
from .checkpoint_file import read_checkpoint

__all__ = ["ClassificationModule", "expected_input", "build_backbone"]

NO_WEIGHT_DECAY = ("bias", "norm", "cls_token", "pos_embed", "alpha", "beta")


def build_backbone(name: str, num_classes: int, kwargs: Mapping[str, Any] | None) -> nn.Module:
    """``timm.create_model(name, num_classes=..., **kwargs)`` with a clear error for unknown names."""
    if not timm.is_model(name):
        hopfield = sorted(timm.list_models("hopfield_vit_*") + timm.list_models("vih*"))
        raise ValueError(
            f"unknown model {name!r}: expected a timm model name, e.g. one of the Hopfield models {hopfield}"
        )
    kwargs = dict(kwargs or {})
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as err:  # a typo in backbone_kwargs (or in its attn_kwargs): name the key
        match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if match is None:
            raise
        key = match.group(1)
        where = "backbone_kwargs" if key in kwargs else "backbone_kwargs.attn_kwargs"
        known = _backbone_options()
        close = difflib.get_close_matches(key, known + list(dict(kwargs.get("attn_kwargs") or {})), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where}: {key!r} is not an option of model {name!r}{hint}; "
                         f"{type(err).__name__}: {err}") from None


def _backbone_options() -> list[str]:
    """Keyword arguments the Hopfield ViTs and ViH accept (for "did you mean" hints)."""
    from timm.models.vision_transformer import VisionTransformer

    from ..models.vih import ViH
    from ..models.vit import hopfield_vit

    names = {"attention", "separation", "attn_kwargs"}
    for fn in (VisionTransformer.__init__, ViH.__init__, hopfield_vit):
        names.update(p for p in inspect.signature(fn).parameters if p not in ("self", "args", "kwargs"))
    return sorted(names)


def expected_input(model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """``(channels, (height, width))`` a timm model takes, from timm's own record of it.

    ``timm.models.get_model_input_config``: the ``pretrained_cfg`` input size of the model (for the
    Hopfield ViTs and ViH, the data set of their tag, see ``hopformer.constants``) updated by the
    ``img_size`` / ``in_chans`` it was created with. The size is ``None`` for models that take any
    size (CNNs, ``dynamic_img_size=True``); both are ``None`` for a model not built by timm.
    """
    if getattr(model, "pretrained_cfg", None) is None:
        return None, None
    config = get_model_input_config(model)
    channels, height, width = config["input_size"]
    return channels, ((height, width) if config["fixed_input_size"] else None)


class ClassificationModule(L.LightningModule):
    """Train a timm-registered image classifier (Hopfield ViT, ViH or any timm model).

    Args:
        backbone: timm model name, e.g. ``"hopfield_vit_tiny_patch4_32"`` or ``"vih_patch4_32"``.
        num_classes: number of classes (must match the data module).
        backbone_kwargs: further ``timm.create_model`` arguments (``separation``, ``attention``,
            ``attn_kwargs``, ``img_size``, ``depth``, ``drop_rate``, ...).
        optimizer: stage-II optimizer, ``"adamw"`` (default), ``"adam"`` (paper) or ``"sgd"``.
        lr: stage-II learning rate (paper: Adam 1e-3).
        weight_decay: weight decay of weight matrices (not of biases, norms, tokens, alpha, beta).
        scheduler: ``"cosine"`` (per step, after ``warmup_epochs`` of linear warm-up) or ``"none"``.
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        label_smoothing: cross-entropy label smoothing.
        init_checkpoint: optional state dict file (``torch.save``'d, or a Lightning checkpoint) loaded
            into the backbone before training, e.g. a plain timm ViT of the same shape.
        compile: wrap the backbone's forward in ``torch.compile`` (``nn.Module.compile``: parameter
            names and checkpoints unchanged); see ``docs/performance.md``.
    """

    monitor = "val_acc"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: str = "hopfield_vit_nano_patch2_8",
        num_classes: int = 10,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        init_checkpoint: str | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {optimizer!r}")
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {scheduler!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.save_hyperparameters()
        self.model = build_backbone(backbone, num_classes, backbone_kwargs)
        if init_checkpoint is not None:
            self._load_init(init_checkpoint)
        if compile:
            self.model.compile()
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        channels, size = expected_input(self.model)
        if channels and size:  # lets Lightning's model summary count FLOPs (else "Total FLOPs: 0")
            self.example_input_array = torch.zeros(1, channels, *size)

    def _load_init(self, path: str) -> None:
        from ..models.vit import load_vit_state_dict

        state = read_checkpoint(path, "init_checkpoint")
        state = state.get("state_dict", state)
        state = {k.removeprefix("model."): v for k, v in state.items()}
        load_vit_state_dict(self.model, state)

    # ------------------------------------------------------------------ checks
    def check_datamodule(self, datamodule: Any) -> None:
        """Raise ``ValueError`` before training when the data does not fit the model."""
        if datamodule is None:
            return
        classes = getattr(datamodule, "num_classes", None)
        if classes and classes != self.num_classes:
            raise ValueError(
                f"model.num_classes={self.num_classes} but the data module {type(datamodule).__name__} "
                f"has {classes} classes: set model.init_args.num_classes={classes}"
            )
        channels, size = expected_input(self.model)
        data_size = getattr(datamodule, "image_size", None)
        if size is not None and data_size and tuple(size) != (data_size, data_size):
            raise ValueError(
                f"image size mismatch: model {self.hparams.backbone!r} accepts {size[0]}x{size[1]} images, "
                f"the data module {type(datamodule).__name__} gives {data_size}x{data_size}: set "
                f"model.init_args.backbone_kwargs.img_size={data_size} or choose a model for that size"
            )
        data_channels = getattr(datamodule, "num_channels", None)
        if channels is not None and data_channels and channels != data_channels:
            raise ValueError(
                f"channel mismatch: model {self.hparams.backbone!r} takes {channels}-channel images, the data "
                f"module gives {data_channels}: set model.init_args.backbone_kwargs.in_chans={data_channels}"
            )

    # ------------------------------------------------------------------ steps
    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def _step(self, batch: Any, stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        metric = getattr(self, f"{stage}_acc")
        metric(logits, labels)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=not on_step)
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        if batch_idx % max(self.trainer.log_every_n_steps, 1) == 0:
            self._log_temperatures()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Predicted class and class probabilities (``predict`` writes them to ``predictions.csv``)."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probabilities = self(images).softmax(dim=-1)
        return {"class": probabilities.argmax(dim=-1), "probabilities": probabilities}

    def _log_temperatures(self) -> None:
        """Log learnable alpha (entmax) and beta (inverse temperature), averaged over heads."""
        from ..layers import HopfieldRetrieval

        for name, module in self.model.named_modules():
            if isinstance(module, HopfieldRetrieval):  # its layer logs the same values under the layer's name
                continue
            alpha = getattr(module, "alpha", None)
            if isinstance(alpha, nn.Module) and any(p.requires_grad for p in alpha.parameters()):
                self.log(f"hopfield/{name}/alpha", alpha().detach().float().mean(), on_step=True, on_epoch=False)
            beta = getattr(module, "beta", None)
            if isinstance(beta, nn.Module) and getattr(beta, "learnable", False):
                self.log(f"hopfield/{name}/beta", torch.as_tensor(beta()).detach().float().mean(), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or any(t in name for t in NO_WEIGHT_DECAY) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        name, lr = self.hparams.optimizer, self.hparams.lr
        if name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr)
        elif name == "adam":
            opt = torch.optim.Adam(groups, lr=lr)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        if self.hparams.scheduler == "none":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(self.trainer.max_epochs or 1, 1)
        warmup = int(self.hparams.warmup_epochs * total / epochs)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
