"""Two-stage U-Hop optimisation (Algorithm 2): stage I moves only the feature maps, stage II the rest."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hopformer.functional import separation_loss
from hopformer.layers import KernelizedHopfieldAttention, uhop_modules
from hopformer.training import ClassificationModule, UHopSeparation, find_uhop_modules


class ToyUHop(nn.Module):
    """A minimal test double of the U-Hop protocol: mean-pooled kernel attention with feature map W."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.eye(dim) + 0.1 * torch.randn(dim, dim))
        self.v = nn.Linear(dim, dim)
        self.cache_memories, self.cached_memories = False, None

    def feature_parameters(self):
        return [self.W]

    def separation_loss(self, memories=None):
        memories = self.cached_memories if memories is None else memories
        return separation_loss(memories @ self.W.T, 2.0, "average").mean()

    def forward(self, x):
        if self.cache_memories:
            self.cached_memories = x.detach()
        phi = x @ self.W.T
        return torch.softmax(phi @ phi.transpose(1, 2), -1) @ self.v(x)


class ToyModule(L.LightningModule):
    def __init__(self, uhop: bool = True, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.layer = ToyUHop(dim) if uhop else nn.Identity()
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data(n: int = 32, tokens: int = 6):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, tokens, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _trainer(callbacks, **kw):
    kw.setdefault("max_steps", 2)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before, module):
    return {k for k, v in module.named_parameters() if not torch.equal(before[k], v)}


def test_stage_one_changes_only_the_feature_maps():
    torch.manual_seed(0)
    module = ToyModule()
    cb = UHopSeparation(steps=3, lr=0.1)
    cb._build(module)
    before = _snapshot(module)
    x, y = _data()[:8]
    losses = cb.separation_step(module, (x, y))
    assert _changed(before, module) == {"layer.W"}
    assert set(losses) == {"layer", "total"}


def test_stage_one_lowers_the_separation_loss():
    torch.manual_seed(0)
    module = ToyModule()
    cb = UHopSeparation(steps=1, lr=0.5)
    cb._build(module)
    batch = _data()[:16]
    first = cb.separation_step(module, batch)["total"]
    for _ in range(20):
        last = cb.separation_step(module, batch)["total"]
    assert last < first - 1e-3


def test_train_embedding_option_adds_the_embedding():
    module = ClassificationModule("hopfield_vit_nano_patch2_8", backbone_kwargs={"attention": "kernelized"})
    plain = UHopSeparation().stage_one_parameters(module)
    with_embed = UHopSeparation(train_embedding=True).stage_one_parameters(module)
    names = {id(p): n for n, p in module.named_parameters()}
    assert {names[id(p)] for p in plain} == {f"model.blocks.{i}.attn.feature_map.weight" for i in range(2)}
    extra = {names[id(p)] for p in with_embed} - {names[id(p)] for p in plain}
    assert extra == {"model.patch_embed.proj.weight", "model.patch_embed.proj.bias", "model.cls_token", "model.pos_embed"}


def test_stage_two_changes_the_rest():
    """A full two-stage step: every parameter moves; the feature map moves by stage I and stage II."""
    torch.manual_seed(0)
    module = ToyModule()
    ref = copy.deepcopy(module)
    before = _snapshot(module)
    _trainer([UHopSeparation(steps=1, lr=0.1)], max_steps=1).fit(module, DataLoader(_data(), batch_size=8))
    assert _changed(before, module) == set(before)
    # Without the callback (single stage), W moves differently: stage I contributed.
    _trainer([], max_steps=1).fit(ref, DataLoader(_data(), batch_size=8))
    assert not torch.allclose(ref.layer.W, module.layer.W)


def test_kernelized_vit_two_stage_logs_and_updates():
    torch.manual_seed(0)
    module = ClassificationModule("hopfield_vit_nano_patch2_8", backbone_kwargs={"attention": "kernelized"})
    assert len(find_uhop_modules(module)) == len(uhop_modules(module)) == 2
    feature = module.model.blocks[0].attn.feature_map.weight
    cb = UHopSeparation(steps=2, lr=0.1)
    cb._build(module)
    before = _snapshot(module)
    images, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    losses = cb.separation_step(module, (images, labels))
    changed = _changed(before, module)
    assert changed == {"model.blocks.0.attn.feature_map.weight", "model.blocks.1.attn.feature_map.weight"}
    assert set(losses) == {"model.blocks.0.attn", "model.blocks.1.attn", "total"}
    assert all(m.cached_memories is None and not m.cache_memories for m in uhop_modules(module))
    assert feature.grad is None


def test_model_without_uhop_trains_single_stage():
    torch.manual_seed(0)
    module = ToyModule(uhop=False)
    cb = UHopSeparation()
    before = _snapshot(module)
    _trainer([cb], max_steps=2).fit(module, DataLoader(_data(), batch_size=8))
    assert not cb.active
    assert _changed(before, module) == set(before)


def test_logging_and_schedules():
    torch.manual_seed(0)
    for schedule in ("every_step", "per_epoch", "pretrain_epochs"):
        module = ToyModule()
        cb = UHopSeparation(schedule=schedule, pretrain_epochs=2)
        trainer = _trainer([cb], max_steps=-1, max_epochs=1)
        trainer.fit(module, DataLoader(_data(), batch_size=8))
        assert "uhop/sep_loss" in trainer.callback_metrics, schedule
        assert "uhop/sep_loss/layer" in trainer.callback_metrics, schedule
    assert cb.pretrain_done


def test_state_dict_round_trip_restores_the_stage_one_optimizer():
    torch.manual_seed(0)
    module = ToyModule()
    cb = UHopSeparation(momentum=0.9)
    cb._build(module)
    cb.separation_step(module, _data()[:8])
    state = copy.deepcopy(cb.state_dict())
    fresh = UHopSeparation(momentum=0.9)
    fresh.load_state_dict(state)  # before the optimizer exists (as when Lightning restores callbacks)
    fresh._build(module)
    buf = fresh.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, state["optimizer"]["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("kwargs", [{"steps": -1}, {"lr": 0.0}, {"optimizer": "lbfgs"}, {"schedule": "sometimes"}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        UHopSeparation(**kwargs)


def test_kernelized_attention_is_found_by_duck_typing():
    layer = KernelizedHopfieldAttention(16, num_heads=2)
    assert find_uhop_modules(nn.Sequential(layer))[0][1] is layer


class ModeRecorder(ToyModule):
    """Records whether the module (and its dropout) is in training mode when stage II runs."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.modes: list[tuple[bool, bool]] = []

    def training_step(self, batch, batch_idx):
        self.modes.append((self.training, self.drop.training))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("schedule", ["every_step", "per_epoch", "pretrain_epochs"])
def test_stage_two_runs_in_training_mode_after_stage_one(schedule):
    """Stage I's memory forward runs in eval mode; stage II must be back in training mode (dropout on)."""
    torch.manual_seed(0)
    module = ModeRecorder()
    _trainer([UHopSeparation(schedule=schedule)], max_steps=-1, max_epochs=1).fit(module, DataLoader(_data(), batch_size=8))
    assert module.modes == [(True, True)] * 4


@pytest.mark.parametrize("passes", [0, 1, 3])
def test_pretrain_epochs_runs_that_many_passes(passes):
    torch.manual_seed(0)
    module = ToyModule()
    cb = UHopSeparation(schedule="pretrain_epochs", pretrain_epochs=passes)
    calls = []
    step = cb.separation_step
    cb.separation_step = lambda m, b: calls.append(len(b[0])) or step(m, b)
    _trainer([cb], max_steps=1).fit(module, DataLoader(_data(), batch_size=8))
    assert calls == [8] * (4 * passes)  # 4 batches per pass, before the first stage-II step


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_every_stage_one_optimizer_lowers_the_loss_and_moves_only_the_feature_map(name, cls):
    torch.manual_seed(0)
    module = ToyModule()
    cb = UHopSeparation(optimizer=name, lr=0.05, steps=1)
    cb._build(module)
    assert type(cb.optimizer) is cls and cb.optimizer.defaults["lr"] == 0.05
    before = _snapshot(module)
    batch = _data()[:16]
    first = cb.separation_step(module, batch)["total"]
    for _ in range(20):
        last = cb.separation_step(module, batch)["total"]
    assert last < first - 1e-3
    assert _changed(before, module) == {"layer.W"}
    if name != "sgd":
        assert cb.optimizer.state_dict()["state"][0]["step"] == 21  # Adam moments kept across steps
