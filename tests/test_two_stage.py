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
    """A full two-stage step: every parameter moves (the feature map by stage I only, by default)."""
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


# -- issue 12: W belongs to stage I; train_embedding; fresh memories; guard; diagnostics ----------
class GradSpy(L.Callback):
    """Records, after every task backward, whether the feature map got a task gradient."""

    def __init__(self) -> None:
        self.task_grad: list[bool] = []

    def on_after_backward(self, trainer, pl_module):
        self.task_grad.append(pl_module.layer.W.grad is not None)


@pytest.mark.parametrize("task_trains", [False, True])
def test_feature_maps_excluded_from_the_task_optimizer_by_default(task_trains):
    """ToyModule's configure_optimizers hands *all* parameters to AdamW: W must still get no task step."""
    torch.manual_seed(0)
    module, spy = ToyModule(), GradSpy()
    cb = UHopSeparation(steps=1, lr=0.1, task_trains_feature_maps=task_trains)
    _trainer([cb, spy], max_steps=3).fit(module, DataLoader(_data(), batch_size=8))
    assert spy.task_grad == [task_trains] * 3
    assert module.layer.W.requires_grad  # restored after fit


def test_excluded_feature_map_follows_stage_one_only():
    """With the default, W after training equals W after the stage-I steps alone on the same memories."""
    torch.manual_seed(0)
    module = ToyModule()
    ref_w = module.layer.W.detach().clone()
    embeds = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            embeds.append((copy.deepcopy(pl_module.embed), batch[0].clone()))

    loader = DataLoader(_data(), batch_size=8)
    _trainer([Spy(), UHopSeparation(steps=1, lr=0.1, max_condition=None)], max_steps=3).fit(module, loader)
    w = ref_w.clone().requires_grad_(True)
    for embed, x in embeds:  # stage I by hand: SGD on the separation loss of the (then current) memories
        with torch.no_grad():
            memories = embed(x)
        loss = separation_loss(memories @ w.T, 2.0, "average").mean()
        (g,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= 0.1 * g
    torch.testing.assert_close(module.layer.W.detach(), w.detach())


def test_feature_maps_excluded_with_classification_module_and_resume(tmp_path):
    """ClassificationModule (its optimizer skips frozen parameters) through a checkpoint resume."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    loader = DataLoader(data, batch_size=8)

    def fit(max_steps, ckpt=None):
        module = ClassificationModule("hopfield_vit_nano_patch2_8", backbone_kwargs={"attention": "kernelized"},
                                      scheduler="none")
        spy = []

        class Spy(L.Callback):
            def on_after_backward(self, trainer, pl_module):
                spy.append(pl_module.model.blocks[0].attn.feature_map.weight.grad)

        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=max_steps, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                            callbacks=[UHopSeparation(), Spy()])
        trainer.fit(module, loader, ckpt_path=ckpt)
        return trainer, spy

    trainer, spy = fit(2)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    _, spy = fit(4, ckpt=str(ckpt))
    assert len(spy) == 2 and all(g is None for g in spy)


def test_train_embedding_moves_the_embedding():
    """Stage I with train_embedding=True changes the patch embedding (memories computed with grad)."""
    torch.manual_seed(0)
    module = ClassificationModule("vih_patch4_32", backbone_kwargs={"attention": "kernelized", "embed_dim": 32,
                                                                    "img_size": 16})
    cb = UHopSeparation(steps=1, lr=0.5, train_embedding=True)
    cb._build(module)
    before = _snapshot(module)
    cb.separation_step(module, (torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)))
    changed = _changed(before, module)
    assert {"model.patch_embed.weight", "model.patch_embed.bias", "model.pos_embed",
            "model.blocks.0.hopfield.feature_map.weight"} <= changed
    assert "model.cls_token" not in changed  # the CLS token is the query, not a memory: no separation gradient
    assert not changed & {"model.head.weight", "model.blocks.0.hopfield.k_proj.weight"}


def test_extra_parameters_without_gradient_fail_clearly():
    module = ToyModule()
    cb = UHopSeparation(extra_parameters=("head",))
    cb._build(module)
    with pytest.raises(RuntimeError, match="does not depend on"):
        cb.separation_step(module, _data()[:8])


class CountingToy(ToyModule):
    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return super().forward(x)


def test_each_inner_step_sees_fresh_memories():
    """Algorithm 2: with steps > 1, a new memory forward after every update of W (memories of the current W)."""
    torch.manual_seed(0)
    module = CountingToy()
    seen = []
    original = module.layer.separation_loss

    def spy(memories=None):
        seen.append((module.layer.cached_memories.clone(), module.layer.W.detach().clone()))
        return original(memories)

    module.layer.separation_loss = spy
    cb = UHopSeparation(steps=3, lr=0.1)
    cb._build(module)
    cb.separation_step(module, _data()[:8])
    assert module.forwards == 3 and len(seen) == 3
    assert not torch.equal(seen[0][1], seen[1][1])  # W moved between the steps


def test_training_forward_memories_need_no_extra_forward():
    """memories='training_forward': one model forward per batch; stage I runs after the task step."""
    torch.manual_seed(0)
    module = CountingToy()
    cb = UHopSeparation(memories="training_forward")
    trainer = _trainer([cb], max_steps=3, log_every_n_steps=1)
    before = module.layer.W.detach().clone()
    trainer.fit(module, DataLoader(_data(), batch_size=8))
    assert module.forwards == 3 and cb.stage_one_steps == 3
    assert not torch.equal(before, module.layer.W) and "uhop/sep_loss" in trainer.callback_metrics
    assert module.layer.cached_memories is None and not module.layer.cache_memories
    with pytest.raises(ValueError, match="training_forward"):
        UHopSeparation(memories="training_forward", train_embedding=True)


def test_rank_guard_keeps_w_full_rank():
    torch.manual_seed(0)
    module = ClassificationModule("hopfield_vit_nano_patch2_8", backbone_kwargs={"attention": "kernelized"})
    fmap = module.model.blocks[0].attn.feature_map
    with torch.no_grad():
        fmap.weight[:, :3] = 0.0
    cb = UHopSeparation(steps=1, max_condition=5.0, guard_every=1)
    cb._build(module)
    cb.separation_step(module, (torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))
    assert fmap.condition_number() <= 5.0 + 1e-3 and cb.guard_events >= 1


def test_diagnostics_are_logged_per_layer():
    torch.manual_seed(0)
    module = ClassificationModule("hopfield_vit_nano_patch2_8", backbone_kwargs={"attention": "kernelized"})
    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    trainer = _trainer([UHopSeparation()], max_steps=2, log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=4))
    metrics = trainer.callback_metrics
    for i in range(2):
        assert metrics[f"uhop/cond/model.blocks.{i}.attn"] >= 1.0
        assert 0.0 < metrics[f"uhop/entropy/model.blocks.{i}.attn"] <= torch.log(torch.tensor(17.0)) + 1e-5


@pytest.mark.parametrize("learnable_alpha", [False, True])
def test_stanhop_feature_maps_leave_the_task_loss(learnable_alpha):
    """The exclusion is generic: every U-Hop layer of STanHop-Net (plain and GSH kernel) is found and frozen for stage II."""
    from hopformer.models import STanHopNet

    torch.manual_seed(0)
    net = STanHopNet(3, 24, 12, seg_len=6, d_model=8, num_heads=2, d_ff=16, num_router=2, attention="kernelized",
                     separation="learnable" if learnable_alpha else "softmax")
    excluded = UHopSeparation().exclude_feature_maps(net)
    assert len(excluded) == len(find_uhop_modules(net)) == 11
    net(torch.randn(2, 24, 3)).square().mean().backward()
    assert all(p.grad is None for p in excluded)
    assert all(p.grad is not None for n, p in net.named_parameters() if p.requires_grad and "router" not in n)


def test_steps_zero_keeps_w_fixed():
    """steps=0: no stage I, and W (owned by stage I) stays at its initialisation: a fixed feature map."""
    torch.manual_seed(0)
    module = ToyModule()
    before = module.layer.W.detach().clone()
    _trainer([UHopSeparation(steps=0)], max_steps=2).fit(module, DataLoader(_data(), batch_size=8))
    assert torch.equal(before, module.layer.W)


def test_memory_sets_uses_a_prefix_of_the_batch():
    torch.manual_seed(0)
    module = ToyModule()
    x = _data()[:8][0]
    cb = UHopSeparation(memory_sets=3, steps=1)
    cb._build(module)
    expected = separation_loss(module.embed(x[:3]).detach() @ module.layer.W.T, 2.0, "average").mean()
    losses = cb.separation_step(module, (x, None))
    assert losses["layer"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="memory_sets"):
        UHopSeparation(memory_sets=0)


def test_diagnostics_without_stage_one():
    """steps=0 with task_trains_feature_maps (a kernelized model trained by the task loss alone) still logs cond/entropy."""
    torch.manual_seed(0)
    module = ClassificationModule("hopfield_vit_nano_patch2_8", backbone_kwargs={"attention": "kernelized"})
    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    trainer = _trainer([UHopSeparation(steps=0, task_trains_feature_maps=True)], max_steps=2, log_every_n_steps=1)
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert "uhop/cond/model.blocks.0.attn" in trainer.callback_metrics
    assert "uhop/sep_loss" not in trainer.callback_metrics


@pytest.mark.parametrize("memories", ["fresh", "training_forward"])
def test_every_n_batches_runs_stage_one_on_every_nth_batch(memories):
    """every_n_batches=n: stage I (and, for 'fresh', its extra forward) only on batches 0, n, 2n, ... of an epoch."""
    torch.manual_seed(0)
    module = CountingToy()
    cb = UHopSeparation(memories=memories, every_n_batches=2)
    _trainer([cb], max_steps=5).fit(module, DataLoader(_data(), batch_size=4))  # 8 batches per epoch: 0..4
    assert cb.stage_one_steps == 3  # batches 0, 2, 4
    assert module.forwards == 5 + (3 if memories == "fresh" else 0)
    assert module.layer.cached_memories is None and not module.layer.cache_memories
    with pytest.raises(ValueError, match="every_n_batches"):
        UHopSeparation(every_n_batches=0)
