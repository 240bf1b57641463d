"""Two-stage U-Hop optimisation (U-Hop paper, Algorithm 2) as a reusable Lightning callback.

Stage I: ``steps`` optimizer steps of the summed separation loss (Def 2.2 / 3.1 / G.2, chosen per
layer) over the memories of the current minibatch, updating the feature maps ``W`` of every U-Hop
layer (plus, optionally, the patch embedding / CLS token as the authors' code did).
Stage II: the LightningModule's own, ordinary optimisation step of the task loss.

``W`` belongs to stage I: while the callback is active the feature maps are taken out of the task
loss (``requires_grad`` is switched off for stage II, so no task optimizer, whatever
``configure_optimizers`` returns, can move them; it is switched on only inside stage I). In the
diagnosis of issue 12 (ViH, dim 512, 500 steps) letting the task optimizer train ``W`` as well
(``task_trains_feature_maps=True``, the paper's Algorithm 2 as published) collapsed the attention onto
one memory and cost 10-13 points; a shorter re-measurement (dim 256, 200 steps) did not reproduce that
gap (docs/uhop_training.md).

Memories (``memories=``): ``"fresh"`` (default) reads them from a forward pass of the current batch
in eval mode before stage II, a new one for each of the ``steps`` inner steps (Algorithm 2, line 4
after ``W`` moved); ``"training_forward"`` caches them (detached) during stage II's own training
forward and runs the stage-I steps after the task step, with no extra model forward.

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

from ..layers.kernel import named_uhop_modules

__all__ = ["UHopSeparation", "find_uhop_modules", "EMBEDDING_PARAMETERS"]

Schedule = Literal["every_step", "per_epoch", "pretrain_epochs"]
SCHEDULES = ("every_step", "per_epoch", "pretrain_epochs")
MemorySource = Literal["fresh", "training_forward"]
MEMORY_SOURCES = ("fresh", "training_forward")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Parameter-name fragments moved in stage I by the authors' code (``train_embedding=True``).
EMBEDDING_PARAMETERS = ("patch_embed", "cls_token", "pos_embed")


# the one U-Hop module finder lives with the layers (``hopformer.layers.named_uhop_modules``)
find_uhop_modules = named_uhop_modules


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
        steps: ``N_i``, separation-loss optimizer steps per stage-I call (paper: 1 per minibatch);
            ``0`` runs no stage I, so ``W`` stays at its initialisation (a fixed full-rank feature map)
            unless ``task_trains_feature_maps``.
        lr: stage-I learning rate (paper: SGD with lr 0.1).
        optimizer: stage-I optimizer, ``"sgd"`` (paper), ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum (0 = plain SGD as in the paper).
        schedule: when stage I runs.
            ``"every_step"``: at every training batch (Algorithm 2, the default);
            ``"per_epoch"``: one full pass of stage I over the training data at the start of every
            epoch (the interleaved schedule of the authors' scripts), no stage I between batches;
            ``"pretrain_epochs"``: ``pretrain_epochs`` passes of stage I over the training data
            before stage II starts, none afterwards.
        pretrain_epochs: number of stage-I passes for ``schedule="pretrain_epochs"``.
        memories: where ``schedule="every_step"`` takes the memories from.
            ``"fresh"``: a forward pass of the batch (eval mode) before stage II, repeated before each
            of the ``steps`` inner steps so every step sees the memories of the current ``W``
            (Algorithm 2 as written; costs one extra model forward per step);
            ``"training_forward"``: cached, detached, from stage II's own training forward; the
            stage-I steps run after the task step (no extra forward; all inner steps share them).
        task_trains_feature_maps: also let the task optimizer (stage II) move ``W``, the paper's
            Algorithm 2 as published. Off by default (docs/uhop_training.md has the measurements).
        train_embedding: also update parameters whose name contains ``patch_embed``, ``cls_token``
            or ``pos_embed`` in stage I, as the authors' code did (off by default: the paper's
            stage I moves only the feature maps). The memories are then computed with gradient.
        extra_parameters: further parameter-name prefixes of the LightningModule (e.g.
            ``"model.patch_embed"``) to update in stage I (memories computed with gradient).
        grad_clip: clip the stage-I gradient norm to this value (``None`` = no clipping).
        memory_sets: use only the first ``memory_sets`` samples' memory sets of the (shuffled) batch in
            each stage-I step: an unbiased estimate of the batch-mean separation loss at a fraction of
            its ``O(B M^2 k)`` cost (``None``: the whole batch, Algorithm 2 exactly).
        max_condition: keep every ``W`` full rank (Assumption 2.1): after stage-I steps, raise its
            singular values to at least ``sigma_max / max_condition`` (``None``: no guard).
        guard_every: apply the ``max_condition`` guard every this many stage-I steps (an SVD of ``W``).
        every_n_batches: with ``schedule="every_step"``, run stage I only on every ``n``-th training
            batch of an epoch (``batch_idx % n == 0``), so its cost per step shrinks ``n``-fold;
            ``1`` (default) is Algorithm 2 exactly. docs/performance.md has the cost per setting.
        log_per_layer: log ``uhop/sep_loss/<layer>`` for every U-Hop layer, besides the total
            ``uhop/sep_loss``.
        log_diagnostics: every ``trainer.log_every_n_steps`` batches log ``uhop/cond/<layer>`` (the
            condition number of ``W``) and ``uhop/entropy/<layer>`` (mean entropy in nats of the
            layer's association weights in the training forward; near 0 = collapse onto one memory).
    """

    def __init__(
        self,
        steps: int = 1,
        lr: float = 0.1,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: float = 0.0,
        schedule: Schedule = "every_step",
        pretrain_epochs: int = 1,
        memories: MemorySource = "fresh",
        task_trains_feature_maps: bool = False,
        train_embedding: bool = False,
        extra_parameters: Sequence[str] = (),
        grad_clip: float | None = None,
        memory_sets: int | None = None,
        max_condition: float | None = 10.0,
        guard_every: int = 10,
        every_n_batches: int = 1,
        log_per_layer: bool = True,
        log_diagnostics: bool = True,
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
        if memories not in MEMORY_SOURCES:
            raise ValueError(f"UHopSeparation: memories must be one of {MEMORY_SOURCES}, got {memories!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"UHopSeparation: grad_clip must be > 0 or None, got {grad_clip!r}")
        if memory_sets is not None and (not isinstance(memory_sets, int) or memory_sets < 1):
            raise ValueError(f"UHopSeparation: memory_sets must be an int >= 1 or None, got {memory_sets!r}")
        if max_condition is not None and not max_condition >= 1:
            raise ValueError(f"UHopSeparation: max_condition must be >= 1 or None, got {max_condition!r}")
        if not isinstance(guard_every, int) or guard_every < 1:
            raise ValueError(f"UHopSeparation: guard_every must be an int >= 1, got {guard_every!r}")
        if not isinstance(every_n_batches, int) or isinstance(every_n_batches, bool) or every_n_batches < 1:
            raise ValueError(f"UHopSeparation: every_n_batches must be an int >= 1, got {every_n_batches!r}")
        if memories == "training_forward" and (train_embedding or extra_parameters):
            raise ValueError(
                "UHopSeparation: memories='training_forward' caches detached memories after the task step, so "
                f"stage I cannot move train_embedding={train_embedding} / extra_parameters={tuple(extra_parameters)}; "
                "use memories='fresh'"
            )
        if memories == "training_forward" and schedule != "every_step":
            raise ValueError(f"UHopSeparation: memories='training_forward' needs schedule='every_step', got {schedule!r}")
        self.steps = steps
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.schedule = schedule
        self.pretrain_epochs = pretrain_epochs
        self.memories = memories
        self.task_trains_feature_maps = task_trains_feature_maps
        self.train_embedding = train_embedding
        self.extra_parameters = tuple(extra_parameters)
        self.grad_clip = grad_clip
        self.memory_sets = memory_sets
        self.max_condition = max_condition
        self.guard_every = guard_every
        self.every_n_batches = every_n_batches
        self.log_per_layer = log_per_layer
        self.log_diagnostics = log_diagnostics
        self.optimizer: torch.optim.Optimizer | None = None
        self.pretrain_done = False
        self.stage_one_steps = 0
        self.guard_events = 0
        self._pending_state: dict[str, Any] | None = None
        self._modules: list[tuple[str, nn.Module]] = []
        self._params: list[nn.Parameter] = []
        self._feature_params: list[nn.Parameter] = []
        self._excluded: list[nn.Parameter] = []
        self._diagnose_batch = False
        self._stage_one_batch = False
        self.last_losses: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    @staticmethod
    def feature_parameters(pl_module: nn.Module) -> list[nn.Parameter]:
        """The feature maps ``W`` of every U-Hop layer of ``pl_module``, without duplicates."""
        params: list[nn.Parameter] = []
        seen: set[int] = set()
        for _, module in find_uhop_modules(pl_module):
            for p in module.feature_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def stage_one_parameters(self, pl_module: nn.Module) -> list[nn.Parameter]:
        """The parameters stage I updates, in a stable order (feature maps first)."""
        params = self.feature_parameters(pl_module)
        seen = {id(p) for p in params}
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
        self._feature_params = self.feature_parameters(pl_module) if self._modules else []
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

    def exclude_feature_maps(self, pl_module: nn.Module) -> list[nn.Parameter]:
        """Take every ``W`` out of the task loss (``requires_grad=False``); returns those switched off.

        Called by ``setup`` (before DDP wraps the model, so DDP's reducer never waits for them) and
        again by ``on_fit_start``. Stage I switches them on only while it computes its own gradient.
        """
        if self.task_trains_feature_maps:
            return []
        for p in self.feature_parameters(pl_module):
            if p.requires_grad:
                p.requires_grad_(False)
                self._excluded.append(p)
        return self._excluded

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.exclude_feature_maps(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._build(pl_module)
        self.exclude_feature_maps(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            for p in self._excluded:
                p.requires_grad_(True)
            self._excluded = []
            self._set_flags(cache=False, grad=False, entropy=False)

    @property
    def active(self) -> bool:
        return self.optimizer is not None and self.steps > 0

    @property
    def _memories_need_graph(self) -> bool:
        return len(self._params) > len(self._feature_params)

    # ------------------------------------------------------------------ stage I
    def _set_flags(self, cache: bool | None = None, grad: bool | None = None, entropy: bool | None = None) -> None:
        for _, module in self._modules:
            if cache is not None:
                module.cache_memories = cache
                if not cache and hasattr(module, "cached_memories") and grad is not None:
                    module.cached_memories = None
            if grad is not None:
                module.cache_with_grad = grad
            if entropy is not None and hasattr(module, "track_entropy"):
                module.track_entropy = entropy

    def _memory_forward(self, pl_module: L.LightningModule, batch: Any) -> None:
        """Fill every layer's ``cached_memories`` from a forward pass in eval mode (with grad if needed)."""
        was_training = pl_module.training
        grad = self._memories_need_graph
        pl_module.eval()
        self._set_flags(cache=True, grad=grad)
        try:
            with torch.set_grad_enabled(grad):
                if callable(getattr(pl_module, "memory_forward", None)):
                    pl_module.memory_forward(batch)
                else:
                    pl_module(_first_input(batch))
        finally:
            for _, module in self._modules:
                module.cache_memories = False
            pl_module.train(was_training)

    def _clear_memories(self) -> None:
        for _, module in self._modules:
            module.cache_memories = False
            if hasattr(module, "cached_memories"):
                module.cached_memories = None

    def _all_reduce_mean(self, grads: list[torch.Tensor]) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for g in grads:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g.div_(world)

    def _descend(self) -> dict[str, float]:
        """One stage-I optimizer step on the cached memories; returns the losses before the step."""
        assert self.optimizer is not None
        switched = [p for p in self._feature_params if not p.requires_grad]
        for p in switched:
            p.requires_grad_(True)
        try:
            per_layer = {name: self._layer_loss(module) for name, module in self._modules}
            total = torch.stack(list(per_layer.values())).sum()
            if not torch.isfinite(total):
                raise FloatingPointError(f"UHopSeparation: non-finite separation loss {total.item()} (per layer: {per_layer})")
            grads = torch.autograd.grad(total, self._params, allow_unused=True)
        finally:
            for p in switched:
                p.requires_grad_(False)
        extra = grads[len(self._feature_params):]
        if extra and all(g is None for g in extra):
            names = [type(m).__name__ for _, m in self._modules]
            raise RuntimeError(
                "UHopSeparation: train_embedding/extra_parameters asked stage I to move parameters the separation "
                f"loss does not depend on (no gradient reached any of them from the U-Hop layers {names}); the "
                "layers must honour cache_with_grad (UHopFeatureMap does)"
            )
        live = [(p, g.detach().clone()) for p, g in zip(self._params, grads) if g is not None]
        self._all_reduce_mean([g for _, g in live])
        for p, g in live:
            p.grad = g
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p, _ in live], self.grad_clip)
        self.optimizer.step()
        for p in self._params:
            p.grad = None
        self.stage_one_steps += 1
        if self.max_condition is not None and self.stage_one_steps % self.guard_every == 0:
            self.guard_events += self.guard_rank()
        losses = {name: float(v.detach()) for name, v in per_layer.items()}
        losses["total"] = float(total.detach())
        return losses

    def _layer_loss(self, module: nn.Module) -> torch.Tensor:
        cached = getattr(module, "cached_memories", None)
        if self.memory_sets is None or cached is None or cached.dim() != 3 or cached.shape[0] <= self.memory_sets:
            return module.separation_loss()
        if cached.shape[1] == 1:  # one memory per sample: the batch is the memory set, keep it whole
            return module.separation_loss()
        return module.separation_loss(cached[: self.memory_sets])

    def guard_rank(self) -> int:
        """Apply the ``max_condition`` floor to every feature map now; returns how many were changed."""
        if self.max_condition is None:
            return 0
        changed = 0
        for _, module in self._modules:
            for sub in module.modules():
                if callable(getattr(sub, "clamp_condition_", None)):
                    changed += int(sub.clamp_condition_(self.max_condition))
        return changed

    def separation_step(self, pl_module: L.LightningModule, batch: Any) -> dict[str, float]:
        """Run stage I on one batch: ``steps`` times a memory forward then one optimizer step.

        Returns the per-layer separation losses of the last step (before its update)."""
        if not self.active:
            return {}
        losses: dict[str, float] = {}
        try:
            for _ in range(self.steps):
                self._memory_forward(pl_module, batch)
                losses = self._descend()
        finally:
            self._clear_memories()
        self.last_losses = losses
        return losses

    def separation_step_cached(self) -> dict[str, float]:
        """Run stage I on the memories cached by the last training forward (``memories="training_forward"``)."""
        if not self.active or any(getattr(m, "cached_memories", None) is None for _, m in self._modules):
            self._clear_memories()
            return {}
        try:
            losses: dict[str, float] = {}
            for _ in range(self.steps):
                losses = self._descend()
        finally:
            self._clear_memories()
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

    def diagnostics(self) -> dict[str, float]:
        """``uhop/cond/<layer>`` (condition number of ``W``) and ``uhop/entropy/<layer>`` (last recorded)."""
        out: dict[str, float] = {}
        for name, module in self._modules:
            feature_map = getattr(module, "feature_map", None)
            if callable(getattr(feature_map, "condition_number", None)):
                out[f"uhop/cond/{name or 'root'}"] = feature_map.condition_number()
            entropy = getattr(module, "last_entropy", None)
            if entropy is not None:
                out[f"uhop/entropy/{name or 'root'}"] = float(entropy)
        return out

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
        if not self._modules:
            return
        self._stage_one_batch = self.active and self.schedule == "every_step" and batch_idx % self.every_n_batches == 0
        if not self.active:
            pass
        elif self.schedule == "every_step" and not self._stage_one_batch:
            pass  # every_n_batches: no stage I on this batch
        elif self.schedule == "every_step" and self.memories == "fresh":
            self._log(pl_module, self.separation_step(pl_module, batch), on_step=True)
        elif self.schedule == "every_step":  # training_forward: cache during stage II's forward
            self._set_flags(cache=True, grad=False)
        elif self.last_losses and batch_idx == 0:
            self._log(pl_module, self.last_losses, on_step=False)
        self._diagnose_batch = self.log_diagnostics and batch_idx % max(trainer.log_every_n_steps, 1) == 0
        if self._diagnose_batch:
            self._set_flags(entropy=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._modules:
            return
        if self._stage_one_batch and self.memories == "training_forward":
            self._stage_one_batch = False
            self._log(pl_module, self.separation_step_cached(), on_step=True)
        if self._diagnose_batch:
            self._set_flags(entropy=False)
            self._diagnose_batch = False
            if getattr(pl_module, "_trainer", None) is not None:
                for key, value in self.diagnostics().items():
                    pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "pretrain_done": self.pretrain_done,
            "stage_one_steps": self.stage_one_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pretrain_done = bool(state_dict.get("pretrain_done", False))
        self.stage_one_steps = int(state_dict.get("stage_one_steps", 0))
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
