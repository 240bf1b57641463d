"""Two-stage U-Hop optimisation (U-Hop paper, Algorithm 2) as a reusable Lightning callback.

Stage I: ``steps`` optimizer steps of the summed separation loss (Def 2.2 / 3.1 / G.2, chosen per
layer) over the memories of the current minibatch, updating only the feature maps ``W`` of every
U-Hop layer (plus, optionally, the patch embedding / CLS token as the authors' code did).
Stage II: the LightningModule's own, ordinary optimisation step of the task loss on all parameters.

The memories of each U-Hop layer are the tokens that enter it; they are read from a no-grad forward
pass in eval mode (``cache_memories = True``, see the U-Hop protocol in docs/ARCHITECTURE.md).
Under DDP the stage-I gradients are averaged over ranks with ``torch.distributed.all_reduce`` before
each step, so every rank holds identical parameters after stage I as well as after stage II.

The callback works with any LightningModule: it asks ``pl_module.memory_forward(batch)`` for the
forward pass when the module defines it, else calls ``pl_module(batch[0])`` (or ``pl_module(batch)``
when the batch is a tensor). Models without U-Hop layers are left alone (the callback does nothing).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["UHopSeparation", "find_uhop_modules", "EMBEDDING_PARAMETERS"]

Schedule = Literal["every_step", "per_epoch", "pretrain_epochs"]
SCHEDULES = ("every_step", "per_epoch", "pretrain_epochs")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Parameter-name fragments moved in stage I by the authors' code (``train_embedding=True``).
EMBEDDING_PARAMETERS = ("patch_embed", "cls_token", "pos_embed")


def find_uhop_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every submodule that follows the U-Hop protocol.

    The protocol (docs/ARCHITECTURE.md): ``feature_parameters()``, ``separation_loss(memories=None)``
    and a boolean ``cache_memories`` attribute. Duck-typed so that any module honouring it
    (``hopformer.layers.kernel.SeparationLossMixin`` subclasses included) takes part.
    """
    found = []
    for name, module in model.named_modules():
        if (
            callable(getattr(module, "separation_loss", None))
            and callable(getattr(module, "feature_parameters", None))
            and hasattr(module, "cache_memories")
        ):
            found.append((name, module))
    return found


def _first_input(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images"):
            if key in batch:
                return batch[key]
        raise TypeError(
            f"UHopSeparation: cannot find the inputs in a dict batch with keys {sorted(batch)}; "
            "define `memory_forward(batch)` on the LightningModule"
        )
    return batch


class UHopSeparation(L.Callback):
    """Stage I of U-Hop's two-stage optimisation (Algorithm 2) for any LightningModule.

    Args:
        steps: ``N_i``, separation-loss optimizer steps per stage-I call (paper: 1 per minibatch).
        lr: stage-I learning rate (paper: SGD with lr 0.1).
        optimizer: stage-I optimizer, ``"sgd"`` (paper), ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum (0 = plain SGD as in the paper).
        schedule: when stage I runs.
            ``"every_step"``: before every training batch (Algorithm 2, the default);
            ``"per_epoch"``: one full pass of stage I over the training data at the start of every
            epoch (the interleaved schedule of the authors' scripts), no stage I between batches;
            ``"pretrain_epochs"``: ``pretrain_epochs`` passes of stage I over the training data
            before stage II starts, none afterwards.
        pretrain_epochs: number of stage-I passes for ``schedule="pretrain_epochs"``.
        train_embedding: also update parameters whose name contains ``patch_embed``, ``cls_token``
            or ``pos_embed`` in stage I, as the authors' code did (off by default: SPEC 2 says only
            the feature maps).
        extra_parameters: further parameter-name prefixes of the LightningModule (e.g.
            ``"model.patch_embed"``) to update in stage I.
        grad_clip: clip the stage-I gradient norm to this value (``None`` = no clipping).
        log_per_layer: log ``uhop/sep_loss/<layer>`` for every U-Hop layer, besides the total
            ``uhop/sep_loss``.
    """

    def __init__(
        self,
        steps: int = 1,
        lr: float = 0.1,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: float = 0.0,
        schedule: Schedule = "every_step",
        pretrain_epochs: int = 1,
        train_embedding: bool = False,
        extra_parameters: Sequence[str] = (),
        grad_clip: float | None = None,
        log_per_layer: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"UHopSeparation: steps must be an int >= 0, got {steps!r}")
        if not lr > 0:
            raise ValueError(f"UHopSeparation: lr must be > 0, got {lr!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"UHopSeparation: optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"UHopSeparation: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not isinstance(pretrain_epochs, int) or pretrain_epochs < 0:
            raise ValueError(f"UHopSeparation: pretrain_epochs must be an int >= 0, got {pretrain_epochs!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"UHopSeparation: grad_clip must be > 0 or None, got {grad_clip!r}")
        self.steps = steps
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.schedule = schedule
        self.pretrain_epochs = pretrain_epochs
        self.train_embedding = train_embedding
        self.extra_parameters = tuple(extra_parameters)
        self.grad_clip = grad_clip
        self.log_per_layer = log_per_layer
        self.optimizer: torch.optim.Optimizer | None = None
        self.pretrain_done = False
        self._pending_state: dict[str, Any] | None = None
        self._modules: list[tuple[str, nn.Module]] = []
        self._params: list[nn.Parameter] = []
        self.last_losses: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def stage_one_parameters(self, pl_module: nn.Module) -> list[nn.Parameter]:
        """The parameters stage I updates, in a stable order (feature maps first)."""
        params: list[nn.Parameter] = []
        seen: set[int] = set()
        for _, module in find_uhop_modules(pl_module):
            for p in module.feature_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        fragments = EMBEDDING_PARAMETERS if self.train_embedding else ()
        for name, p in pl_module.named_parameters():
            wanted = any(f in name for f in fragments) or any(name.startswith(x) for x in self.extra_parameters)
            if wanted and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def _build(self, pl_module: L.LightningModule) -> None:
        self._modules = find_uhop_modules(pl_module)
        self._params = self.stage_one_parameters(pl_module) if self._modules else []
        if not self._params:
            self.optimizer = None
            return
        kwargs: dict[str, Any] = {"lr": self.lr}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        self.optimizer = OPTIMIZERS[self.optimizer_name](self._params, **kwargs)
        if self._pending_state is not None and self._pending_state.get("optimizer") is not None:
            self.optimizer.load_state_dict(self._pending_state["optimizer"])
        self._pending_state = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._build(pl_module)

    @property
    def active(self) -> bool:
        return self.optimizer is not None and self.steps > 0

    # ------------------------------------------------------------------ stage I
    def _memory_forward(self, pl_module: L.LightningModule, batch: Any) -> None:
        was_training = pl_module.training
        pl_module.eval()
        for _, module in self._modules:
            module.cache_memories = True
        try:
            with torch.no_grad():
                if callable(getattr(pl_module, "memory_forward", None)):
                    pl_module.memory_forward(batch)
                else:
                    pl_module(_first_input(batch))
        finally:
            for _, module in self._modules:
                module.cache_memories = False
            pl_module.train(was_training)

    def _all_reduce_mean(self, grads: list[torch.Tensor]) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for g in grads:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g.div_(world)

    def separation_step(self, pl_module: L.LightningModule, batch: Any) -> dict[str, float]:
        """Run stage I on one batch: a no-grad memory forward, then ``steps`` optimizer steps.

        Returns the per-layer separation losses of the last step (before its update)."""
        if not self.active:
            return {}
        assert self.optimizer is not None
        self._memory_forward(pl_module, batch)
        losses: dict[str, float] = {}
        for _ in range(self.steps):
            per_layer = {name: module.separation_loss() for name, module in self._modules}
            total = torch.stack(list(per_layer.values())).sum()
            if not torch.isfinite(total):
                raise FloatingPointError(f"UHopSeparation: non-finite separation loss {total.item()} (per layer: {per_layer})")
            grads = torch.autograd.grad(total, self._params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(self._params, grads)]
            self._all_reduce_mean(grads)
            for p, g in zip(self._params, grads):
                p.grad = g
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            self.optimizer.step()
            for p in self._params:
                p.grad = None
            losses = {name: float(v.detach()) for name, v in per_layer.items()}
            losses["total"] = float(total.detach())
        for _, module in self._modules:
            if hasattr(module, "cached_memories"):
                module.cached_memories = None
        self.last_losses = losses
        return losses

    def _log(self, pl_module: L.LightningModule, losses: dict[str, float], on_step: bool) -> None:
        if not losses or getattr(pl_module, "_trainer", None) is None:
            return
        pl_module.log("uhop/sep_loss", losses["total"], on_step=on_step, on_epoch=True, batch_size=1)
        if self.log_per_layer:
            for name, value in losses.items():
                if name != "total":
                    pl_module.log(f"uhop/sep_loss/{name or 'root'}", value, on_step=on_step, on_epoch=True, batch_size=1)

    def _pass_over_data(self, trainer: L.Trainer, pl_module: L.LightningModule, passes: int) -> dict[str, float]:
        loaders = trainer.train_dataloader
        if loaders is None:
            return {}
        loader = loaders if not isinstance(loaders, (list, tuple, dict)) else _first_loader(loaders)
        losses: dict[str, float] = {}
        for epoch in range(passes):
            _set_epoch(loader, trainer.current_epoch * max(passes, 1) + epoch)
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch)
                losses = self.separation_step(pl_module, batch)
        return losses

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and self.schedule == "pretrain_epochs" and not self.pretrain_done:
            losses = self._pass_over_data(trainer, pl_module, self.pretrain_epochs)
            self.pretrain_done = True
            if losses:
                pl_module.print(f"U-Hop stage I pretraining ({self.pretrain_epochs} passes): separation loss {losses['total']:.4f}")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and self.schedule == "per_epoch":
            self._pass_over_data(trainer, pl_module, 1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.active and self.schedule == "every_step":
            self._log(pl_module, self.separation_step(pl_module, batch), on_step=True)
        elif self.active and self.last_losses and batch_idx == 0:
            self._log(pl_module, self.last_losses, on_step=False)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "pretrain_done": self.pretrain_done,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pretrain_done = bool(state_dict.get("pretrain_done", False))
        if self.optimizer is not None and state_dict.get("optimizer") is not None:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        else:
            self._pending_state = dict(state_dict)


def _first_loader(loaders: Iterable | dict) -> Any:
    if isinstance(loaders, dict):
        return next(iter(loaders.values()))
    return next(iter(loaders))


def _set_epoch(loader: Any, epoch: int) -> None:
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
