"""Forecasting module: schedule, end-to-end learning on ETTh1 (beats repeat-last-value), run-dir outputs, U-Hop."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from hopformer.data import TimeSeriesDataModule
from hopformer.models import DLinear, RepeatLast, STanHopNet
from hopformer.training.forecasting import ForecastingModule, crossformer_type1_factor
from shared_data import SHARED_DATA
from test_configs import TABLE

ETTH1 = SHARED_DATA / "ett" / "ETTh1.csv"


def generated_csv(path: Path, rows: int = 6000, seed: int = 0) -> Path:
    """Daily and weekly cycles with noise: repeat-last-value is a poor forecaster of these."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    cols = {"date": pd.date_range("2016-07-01", periods=rows, freq="h").astype(str)}
    for i in range(4):
        cols[f"s{i}"] = np.sin(2 * np.pi * t / 24 + i) + 0.5 * np.sin(2 * np.pi * t / 168) + 0.2 * rng.standard_normal(rows)
    pd.DataFrame(cols).to_csv(path, index=False)
    return path


def datamodule(tmp_path: Path, input_len: int, horizon: int, **kw) -> TimeSeriesDataModule:
    if ETTH1.exists():
        return TimeSeriesDataModule("ETTh1", path=str(ETTH1), input_len=input_len, horizon=horizon, **kw)
    path = generated_csv(tmp_path / "generated.csv")
    return TimeSeriesDataModule("custom", path=str(path), input_len=input_len, horizon=horizon, **kw)


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    opts = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, gradient_clip_val=5, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    return L.Trainer(**{**opts, **kw})


def test_crossformer_type1_schedule():
    assert [crossformer_type1_factor(e) for e in range(12)] == [1, 1, .5, .5, .25, .25, .125, .125, .0625, .0625,
                                                                  .03125, .03125]
    assert crossformer_type1_factor(40) == 0.03125
    with pytest.raises(ValueError, match="lr_schedule"):
        ForecastingModule(RepeatLast(4, 2), lr_schedule="cosine")


@pytest.mark.parametrize("revin", [False, True])
def test_short_fit_on_etth1_beats_repeat_last_value(tmp_path, revin):
    """A small STanHop-Net trained for ~100 steps beats the naive forecast on the whole validation split."""
    L.seed_everything(0)
    dm = datamodule(tmp_path, input_len=48, horizon=24, batch_size=32, eval_batch_size=512)
    dm.setup("fit")
    net = STanHopNet(dm.num_series, 48, 24, seg_len=12, win_size=2, num_layers=1, d_model=16, num_heads=2,
                     d_ff=32, num_router=4, dropout=0.0, revin=revin)
    module = ForecastingModule(net, lr=3e-3, lr_schedule="none", plot_windows=0)
    trainer(tmp_path, limit_train_batches=100, limit_val_batches=0).fit(module, dm)
    learned = trainer(tmp_path).validate(module, dm, verbose=False)[0]["val_mse"]
    naive = trainer(tmp_path).validate(ForecastingModule(RepeatLast(48, 24, dm.num_series)), dm, verbose=False)[0]["val_mse"]
    assert learned < 0.9 * naive, (learned, naive)


def test_test_writes_metrics_and_plot_and_handles_ms(tmp_path):
    L.seed_everything(0)
    dm = datamodule(tmp_path, input_len=30, horizon=10, batch_size=16, eval_batch_size=256, features="MS")
    dm.setup("fit")
    module = ForecastingModule(DLinear(30, 10, dm.num_series), lr=1e-3, plot_windows=3)
    tr = trainer(tmp_path, limit_train_batches=5, limit_val_batches=2, limit_test_batches=3)
    tr.fit(module, dm)
    results = tr.test(module, dm, verbose=False)[0]
    assert {"test_mse", "test_mae", "test_orig_mse", "test_orig_mae"} <= set(results)
    saved = json.loads((tmp_path / "test_metrics.json").read_text())
    assert saved["test_mse"] == pytest.approx(results["test_mse"], rel=1e-5)
    assert saved["epochs"] == 1 and saved["epoch_time_s_mean"] > 0 and saved["model"] == "DLinear"
    # original scale = normalised errors times the target's training std (squared for MSE)
    std = float(dm.target_scale()[1][0])
    assert saved["test_orig_mae"] == pytest.approx(saved["test_mae"] * std, rel=1e-4)
    assert saved["test_orig_mse"] == pytest.approx(saved["test_mse"] * std**2, rel=1e-4)
    assert (tmp_path / "test_metrics.csv").read_text().startswith("test_")
    assert (tmp_path / "predictions.png").stat().st_size > 1000


def test_series_mismatch_is_a_clear_error(tmp_path):
    dm = datamodule(tmp_path, input_len=24, horizon=12)
    module = ForecastingModule(RepeatLast(24, 12, 3))
    with pytest.raises(ValueError, match="num_series=3"):
        module.check_datamodule(dm)


def test_plug_memory_is_filled_from_training_windows(tmp_path):
    dm = datamodule(tmp_path, input_len=24, horizon=12, eval_batch_size=256)
    dm.setup("fit")
    net = STanHopNet(dm.num_series, 24, 12, seg_len=6, d_model=8, num_heads=2, d_ff=16, num_router=2,
                     memory="plug", memory_kwargs={"size": 32})
    module = ForecastingModule(net, memory_windows=16, plot_windows=0)
    assert module.strict_loading is False  # checkpoints of the plain net load into it
    trainer(tmp_path, limit_test_batches=2).test(module, dm, verbose=False)
    assert int(net.encoder[0].memory.count) == 32


def test_train_memory_only_freezes_the_backbone():
    net = STanHopNet(3, 24, 12, seg_len=6, d_model=8, num_heads=2, d_ff=16, memory="tune", memory_kwargs={"size": 4})
    module = ForecastingModule(net, train_memory_only=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".memory." in n for n in trainable)


def test_uhop_two_stage_moves_only_the_feature_maps(tmp_path):
    pytest.importorskip("hopformer.layers.kernel")
    from hopformer.training.two_stage import UHopSeparation, find_uhop_modules

    L.seed_everything(0)
    dm = datamodule(tmp_path, input_len=24, horizon=12, batch_size=16)
    dm.setup("fit")
    net = STanHopNet(dm.num_series, 24, 12, seg_len=6, d_model=8, num_heads=2, d_ff=16, num_router=2,
                     attention="kernelized", separation="softmax")
    module = ForecastingModule(net, lr=1e-3, plot_windows=0)
    assert len(find_uhop_modules(module)) == 3 * 3 + 2  # 3 per block (1 encoder + 2 decoder), 1 cross per decoder layer
    callback = UHopSeparation(steps=1, lr=0.1)
    callback._build(module)
    batch = next(iter(dm.train_dataloader()))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    losses = callback.separation_step(module, batch)
    assert losses and all(np.isfinite(v) for v in losses.values())
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("feature_map" in n for n in moved)
    trainer(tmp_path, limit_train_batches=3, limit_val_batches=1, callbacks=[UHopSeparation(steps=1, lr=0.1)]).fit(module, dm)


FAST_CONFIGS = {"forecast_default", "stanhop_etth1_96", "stanhop_etth1_96_uhop", "stanhop_etth1_720_uhop",
                "stanhop_wth_336", "stanhop_wth_720_uhop", "forecast_dlinear_etth1_96", "forecast_repeat_last_etth1_96",
                "stanhop_etth1_96_plug", "stanhop_etth1_96_tune"}
# The paper settings as documented commands (docs/configs.md; tests/test_configs.py checks their values).
FORECAST_CONFIGS = [
    pytest.param(name, marks=() if name in FAST_CONFIGS else pytest.mark.slow)
    for name in sorted(TABLE) if name.startswith(("stanhop_", "forecast_"))
]
REAL_CSV = {"ETTh1": ETTH1, "WTH": SHARED_DATA / "wth" / "WTH.csv", "ETTm1": SHARED_DATA / "ett" / "ETTm1.csv"}
SERIES = {"ETTh1": 7, "ETTm1": 7, "WTH": 12}


@pytest.mark.parametrize("name", FORECAST_CONFIGS)
def test_configs_build(name, tmp_path):
    """Every forecasting setting parses and instantiates on the real CSV (model shrunk to keep this fast);
    input_len, horizon and the series count reach the model from the data (the CLI's links)."""
    from hopformer.cli import HopformerCLI

    args = TABLE[name][1]
    dataset = next((d for d in ("ETTm1", "WTH") if d.lower() in name), "ETTh1")
    if not REAL_CSV[dataset].is_file():
        pytest.skip(f"{REAL_CSV[dataset]} not found")
    args = [*args, "--data.init_args.root", str(REAL_CSV[dataset].parent),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    if name.startswith("stanhop_"):
        args += ["--model.init_args.model.init_args.d_model", "8", "--model.init_args.model.init_args.d_ff", "8"]
    cli = HopformerCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args, auto_configure_optimizers=False, save_config_callback=None)
    net, dm = cli.model.model, cli.datamodule
    assert isinstance(cli.model, ForecastingModule)
    assert net.input_len == dm.input_len and net.horizon == dm.horizon
    assert getattr(net, "num_series", None) in (None, SERIES[dataset]) and dm.num_series == SERIES[dataset]
    assert cli.trainer.gradient_clip_val == 5
    assert any(type(c).__name__ == "EarlyStopping" and c.monitor == "val_mse" for c in cli.trainer.callbacks)
    assert any(type(c).__name__ == "UHopSeparation" for c in cli.trainer.callbacks) == ("uhop" in name)


def test_init_checkpoint_loads_plain_weights_into_a_memory_net(tmp_path):
    kw = dict(seg_len=6, d_model=8, num_heads=2, d_ff=16, num_router=2)
    plain = ForecastingModule(STanHopNet(3, 24, 12, **kw))
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": plain.state_dict()}, ckpt)
    tuned = ForecastingModule(STanHopNet(3, 24, 12, memory="tune", **kw), init_checkpoint=str(ckpt),
                              train_memory_only=True)
    torch.testing.assert_close(tuned.model.embedding.linear.weight, plain.model.embedding.linear.weight)
    with pytest.raises(ValueError, match="does not fit"):
        ForecastingModule(STanHopNet(3, 24, 12, **{**kw, "d_ff": 8}), init_checkpoint=str(ckpt))


class _FirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self.x = batch["x"].clone()


def _first_batch(tmp_path: Path, global_seed: int, data_seed) -> torch.Tensor:
    L.seed_everything(global_seed)
    path = generated_csv(tmp_path / "generated.csv", rows=1500)
    dm = TimeSeriesDataModule("custom", path=str(path), input_len=24, horizon=8, batch_size=16, seed=data_seed)
    dm.setup("fit")
    probe = _FirstBatch()
    logger = L.pytorch.loggers.CSVLogger(tmp_path)  # a logger merges module and data hparams: no key clash
    trainer(tmp_path, limit_train_batches=1, limit_val_batches=0, callbacks=[probe], logger=logger).fit(
        ForecastingModule(DLinear(24, 8, dm.num_series), plot_windows=0), dm)
    return probe.x


def test_batch_order_follows_the_global_seed_unless_the_data_seed_is_set(tmp_path):
    """With no data seed, `seed_everything` decides the shuffle: seeds of a comparison see other batch orders."""
    a, a_again, b = (_first_batch(tmp_path, s, None) for s in (1, 1, 2))
    assert torch.equal(a, a_again)
    assert not torch.equal(a, b)
    # an explicit data seed fixes the order whatever the global seed
    assert torch.equal(_first_batch(tmp_path, 1, 7), _first_batch(tmp_path, 2, 7))
