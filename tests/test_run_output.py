"""What a run shows and leaves behind: plain progress lines without a TTY, predictions in the run folder,
options without a subcommand, ``--threads``, and no warnings from the CLI's own causes."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from hopformer import cli
from hopformer.training.predictions import PredictionWriter
from hopformer.training.progress import PlainProgressBar, format_duration

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train_loss", loss, prog_bar=True)
        time.sleep(0.01)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_score", self.layer(batch[0]).mean(), prog_bar=True)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4)), batch_size=8)

    val_dataloader = train_dataloader

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_plain_progress_bar_prints_steps_throughput_eta_and_metrics(tmp_path):
    stream = io.StringIO()
    bar = PlainProgressBar(interval=0.02, stream=stream)
    trainer = L.Trainer(max_epochs=2, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(_Tiny())
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[fit] epoch 1/2  step 1/10 (10.0%)"), lines
    assert all("it/s" in line for line in lines)
    assert any("samples/s" in line and "ETA" in line and "train_loss" in line for line in lines), lines
    assert any("val_score" in line for line in lines if line.startswith("[fit: validated]")), lines
    assert lines[-1].startswith("[fit] done: 2 epochs, 10 steps"), lines
    assert len(lines) >= 4
    with pytest.raises(ValueError, match="interval=0"):
        PlainProgressBar(interval=0)
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"


def test_piped_train_py_prints_progress_while_it_runs(tmp_path):
    """`python train.py ... > log.txt`: a progress line is in the log before the run ends (no TTY)."""
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "train.py", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
           "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--model.init_args.warmup_epochs", "0",
           "--trainer.default_root_dir", str(tmp_path / "runs")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, env=env, text=True)
        seen_while_running = False
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if "[fit] epoch 1/2  step 1/" in log.read_text():
                seen_while_running = proc.poll() is None
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert seen_while_running, text
    assert text.index("[fit] epoch 1/2") < text.index("[fit] done") < text.index("test accuracy")
    assert text.count("[fit: validated] epoch") == 2  # one line per validation, no bar redrawn into the log


def test_predict_writes_class_and_probabilities_to_the_run_folder(tmp_path, capsys):
    run = cli.main(["predict", "--config", str(DEFAULT), *QUIET, "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    path = tmp_path / "version_0" / "predictions.csv"
    assert f"predictions written to {path}" in out
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["index", "class", *(f"prob_{k}" for k in range(10))]
    assert len(rows) - 1 == len(run.datamodule.predict_dataloader().dataset)
    probs = np.array([[float(v) for v in row[2:]] for row in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert [int(row[1]) for row in rows[1:]] == probs.argmax(1).tolist()


def test_prediction_writer_saves_forecasts(tmp_path):
    from hopformer.data import TimeSeriesDataModule
    from hopformer.models import DLinear
    from hopformer.training.forecasting import ForecastingModule
    from test_forecasting import generated_csv

    dm = TimeSeriesDataModule("custom", path=str(generated_csv(tmp_path / "g.csv", rows=800)), input_len=24,
                              horizon=6, batch_size=16, eval_batch_size=64)
    dm.setup("predict")
    writer = PredictionWriter(output_dir=str(tmp_path / "out"))
    trainer = L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.predict(ForecastingModule(DLinear(24, 6, dm.num_series), plot_windows=0), datamodule=dm)
    forecast = np.load(tmp_path / "out" / "forecast.npy")
    original = np.load(tmp_path / "out" / "forecast_original_scale.npy")
    windows = len(dm.datasets["test"])
    assert forecast.shape == original.shape == (windows, 6, dm.num_series)
    mean, std = (t.numpy() for t in dm.target_scale())
    np.testing.assert_allclose(original, forecast * std + mean, rtol=1e-5, atol=1e-5)
    rows = list(csv.reader((tmp_path / "out" / "predictions.csv").open()))
    assert rows[0][:3] == ["window", "step", "series_0"] and len(rows) - 1 == windows * 6
    with pytest.raises(ValueError, match="write_interval='batch'"):
        PredictionWriter(write_interval="batch")


def test_options_without_a_subcommand_fit_the_default_config(tmp_path):
    args = cli.default_args(["--trainer.max_epochs", "2"])
    assert args == ["fit", "--config", str(cli.DEFAULT_CONFIG), "--test_after_fit", "true", "--trainer.max_epochs", "2"]
    assert cli.default_args(["--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert cli.default_args(["fit", "--config", "x.yaml"]) is None
    assert cli.default_args(["--help"]) is None
    run = cli.main(["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path), "--threads", "1",
                    "--trainer.log_every_n_steps", "1",
                    *QUIET])
    assert run.subcommand == "fit" and run.trainer.current_epoch == 1
    assert torch.get_num_threads() == 1


def test_help_does_not_call_the_subcommand_required(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "(required)" not in out and "fits configs/default.yaml" in out


def test_cli_run_raises_no_warnings(tmp_path):
    """The causes are fixed (ckpt_path='best' with two ModelCheckpoints, pytest's argv, FLOPs 0), not hidden."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main(["fit", "--config", str(DEFAULT), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                  "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--test_after_fit", "true",
                  "--trainer.log_every_n_steps", "1",
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])
    messages = [f"{w.category.__name__}: {w.message}" for w in caught
                if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert messages == []


def test_offline_download_is_one_line_and_leaves_no_folders(tmp_path, monkeypatch, capsys):
    """`python train.py fit --config configs/forecast/base.yaml --config configs/forecast/small.yaml
    --data.init_args.download true` offline."""
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "fit", "--config", str(ROOT / "configs" / "forecast" / "base.yaml"),
                                      "--config", str(ROOT / "configs" / "forecast" / "small.yaml"),
                                      "--data.init_args.download", "true"])
    with pytest.raises(SystemExit) as err:
        cli.main()
    assert err.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: could not download") and "--data.init_args.root" in message
    assert "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no empty data/ or runs/forecast/


def test_missing_ett_file_names_the_root_option(tmp_path):
    from hopformer.data import TimeSeriesDataModule

    with pytest.raises(FileNotFoundError, match=r"--data\.init_args\.root"):
        TimeSeriesDataModule("ETTh1", root=str(tmp_path / "nowhere"), input_len=5, horizon=2).prepare_data()


def test_cifar10_offline_mentions_the_folder_configs(tmp_path, monkeypatch):
    from torchvision import datasets

    from hopformer.data import CIFAR10DataModule
    from hopformer.data.errors import DownloadError

    with pytest.raises(FileNotFoundError, match=r"configs/images/cifar10_folder\.yaml"):
        CIFAR10DataModule(str(tmp_path / "nowhere"), download=False)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(DownloadError, match=r"configs/images/cifar10_folder\.yaml"):
        CIFAR10DataModule(str(tmp_path / "data"), download=True).prepare_data()
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("sub", ["fit", "predict"])
def test_run_folder_is_printed_at_start_and_end(tmp_path, capsys, sub):
    extra = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--test_after_fit", "false"] if sub == "fit" else []
    cli.main([sub, "--config", str(DEFAULT), *QUIET, *extra, "--trainer.default_root_dir", str(tmp_path)])
    out = capsys.readouterr().out
    folder = (tmp_path / "version_0").resolve()
    assert f"starting {sub}: run folder {folder}" in out
    assert f"finished {sub}: run folder {folder}" in out
    assert out.index(f"starting {sub}") < out.index(f"finished {sub}")


def test_rejected_layer_option_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    """`python train.py --model.init_args.backbone_kwargs.separation bogus`: the registry's message as one
    `train.py: error:` line (exit status 1) before any training, no traceback, no empty run folders."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(ROOT / "configs" / "default.yaml"),
                                      "--model.init_args.backbone_kwargs.separation", "bogus"])
    with pytest.raises(SystemExit) as err:
        cli.main()
    assert err.value.code == 1
    stderr = capsys.readouterr().err
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("train.py: error: separation must be one of") and "'bogus'" in message
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_rejected_layer_option_raises_for_python_callers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="separation must be one of"):
        cli.main(["fit", "--config", str(ROOT / "configs" / "default.yaml"),
                  "--model.init_args.backbone_kwargs.separation", "bogus"])
