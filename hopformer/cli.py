"""``train.py``: the project's LightningCLI (subclass mode for both the model and the data).

    python train.py                                   # fit configs/default.yaml, then test the best checkpoint
    python train.py fit --config configs/<name>.yaml  # any experiment
    python train.py test --config configs/<name>.yaml --ckpt_path runs/<name>/version_0/checkpoints/best.ckpt
    python train.py validate|predict ...              # the other Lightning subcommands
    python train.py fit --config ... --ckpt_path last.ckpt   # resume

What this CLI adds to ``LightningCLI``:

- ``seed_everything`` defaults to 0 (workers seeded too); the parsed config is saved to the run
  directory (``config.yaml``, LightningCLI's ``SaveConfigCallback``).
- Loggers: unless ``trainer.logger`` is set, a ``CSVLogger`` and a ``TensorBoardLogger`` both writing
  to ``<trainer.default_root_dir>/version_<n>`` (default root ``runs/``). wandb through the config
  (``lightning.pytorch.loggers.WandbLogger`` with ``offline: true``, or ``WANDB_MODE=offline``);
  ``WANDB_DIR`` defaults to the run root, ``WANDB_CACHE_DIR``/``WANDB_DATA_DIR`` to ``<root>/wandb/{cache,data}``,
  so nothing is written to ``~/.cache`` or ``~/.local/share``.
- Callbacks: ``RichProgressBar`` (unless ``trainer.enable_progress_bar: false``),
  ``LearningRateMonitor`` (when logging), and ``ModelCheckpoint`` configured under ``checkpoint:``
  whose ``monitor``/``mode`` default to the module class attributes ``monitor``/``monitor_mode``
  (``val_acc``/max for classification), writing ``checkpoints/best-*.ckpt``; a second one keeps
  ``checkpoints/last.ckpt`` at the latest epoch for resuming (``--ckpt_path .../last.ckpt``).
- Checks before any work: the module's ``check_datamodule(datamodule)`` (image size, channels,
  classes); unknown model names and missing data folders fail when the classes are built.
- ``--test_after_fit true``: after ``fit``, validate and test the best checkpoint and print the metrics.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

__all__ = ["HopformerCLI", "main", "DEFAULT_CONFIG"]

# The repository's configs/default.yaml (editable install or a checkout); else ./configs/default.yaml
# (a non-editable install run from the repository root, as in docker/).
_REPO_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
DEFAULT_CONFIG = _REPO_DEFAULT if _REPO_DEFAULT.is_file() else Path("configs") / "default.yaml"


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return None


def default_loggers(root: str | os.PathLike) -> list[Logger]:
    """A CSV and a TensorBoard logger sharing one ``<root>/version_<n>`` directory."""
    csv = CSVLogger(save_dir=str(root), name="")
    tensorboard = TensorBoardLogger(save_dir=str(root), name="", version=csv.version, default_hp_metric=False)
    return [csv, tensorboard]


class HopformerCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": None,
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,
                "checkpoint.filename": "best-{epoch:03d}-{step:06d}",
                "trainer.default_root_dir": "runs",
            }
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after fit: validate and test the best checkpoint and print validation and test metrics",
        )
        parser.add_argument(
            "--threads",
            type=Optional[int],
            default=None,
            help="torch CPU threads (torch.set_num_threads) before any work; 1 is fastest on a machine shared "
            "with other jobs (README, Performance tips). Default: torch's choice (the number of cores)",
        )

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # main() runs `fit` when no subcommand is given: say so instead of jsonargparse's "(required)"
        parser.description = "hopformer: train, validate, test or predict with a config from configs/ (hopformer/cli.py)"
        action = parser._subcommands_action
        action.help = ("optional: without one, `python train.py [--option value ...]` fits configs/default.yaml "
                       "(the options override it) and tests the best checkpoint")
        action._jsonargparse_preexpanded_help = True

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None:
            return super().parse_arguments(parser, args)
        # An explicit command (tests, hopformer.compare, main(args)) replaces sys.argv, which then belongs to
        # someone else (e.g. pytest): LightningCLI's warning about both being set does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
            return super().parse_arguments(parser, args)

    def _subconfig(self, config: Any) -> Any:
        return config.get(str(self.subcommand), config) if self.subcommand else config

    def before_instantiate_classes(self) -> None:
        cfg = self._subconfig(self.config)
        model_cls = _import(getattr(cfg.model, "class_path", "") or "")
        if cfg.get("checkpoint") is not None and cfg.checkpoint.monitor is None and model_cls is not None:
            cfg.checkpoint.monitor = getattr(model_cls, "monitor", None)
            cfg.checkpoint.mode = getattr(model_cls, "monitor_mode", cfg.checkpoint.mode)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        root = cfg.trainer.default_root_dir or "runs"
        os.environ.setdefault("WANDB_DIR", str(root))
        for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # else wandb writes under ~/.cache and ~/.local/share
            os.environ.setdefault(var, str(Path(root) / "wandb" / var.split("_")[1].lower()))
        _note_new_dir(Path(os.environ["WANDB_DIR"]))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # jsonargparse wraps a data module's FileNotFoundError (the data is Optional, a Union) in a
            # ValueError listing every Union member; re-raise the original, clear message.
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, FileNotFoundError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        root = trainer_cfg.get("default_root_dir") or "runs"
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(root)
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if trainer_cfg.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(RichProgressBar() if sys.stdout.isatty() else _plain_progress())  # plain lines in logs
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            callbacks.append(_prediction_writer())  # predictions.csv / forecast.npy in the run folder
        if trainer_cfg.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        # ModelCheckpoint(save_last=True) refreshes last.ckpt only when a new best is saved; a second
        # checkpoint callback without a monitor keeps last.ckpt at the latest epoch (for resuming).
        # It goes after the "best" one so that trainer.checkpoint_callback (and ckpt_path="best") is the best.
        if config.get("enable_checkpointing", True) is not False:
            callbacks = [*callbacks, ModelCheckpoint(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)]
        else:  # the `checkpoint:` group would contradict enable_checkpointing=false
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _check(self) -> None:
        check = getattr(self.model, "check_datamodule", None)
        if callable(check):
            check(self.datamodule)

    before_validate = before_test = before_predict = _check

    def before_fit(self) -> None:
        self._check()

    def after_fit(self) -> None:
        if not self._subconfig(self.config).get("test_after_fit", False):
            return
        # the best checkpoint's path (ckpt_path="best" warns when a second ModelCheckpoint keeps last.ckpt)
        ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
        val = self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
        test = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, verbose=False)
        if self.trainer.is_global_zero:
            where = ckpt or "last weights"
            print(f"\nBest checkpoint: {where}")
            for name, results in (("validation", val), ("test", test)):
                for key, value in sorted((results[0] if results else {}).items()):
                    print(f"  {name:<10} {key:<12} {value:.4f}")
            accs = {k: v for r in (val, test) for k, v in (r[0] if r else {}).items() if k.endswith("_acc")}
            if accs:
                print("  " + ", ".join(f"{'validation' if k.startswith('val') else 'test'} accuracy {v:.2%}" for k, v in accs.items()))


def filter_known_warnings() -> None:
    """The one place where the CLI silences warnings, each understood and harmless here.

    - Lightning 2.6's ``utilities/_pytree.py`` calls ``isinstance(treespec, LeafSpec)``, deprecated in
      torch >= 2.10: a Lightning/torch version pairing, nothing a user can change.

    (LightningCLI's warning about ``args`` and ``sys.argv`` both set is handled in
    ``HopformerCLI.parse_arguments``.)
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


_NEW_DIRS: list[Path] = []  # folders this process created before the work started (removed again if left empty)


def _note_new_dir(path: Path) -> None:
    """Remember the top-most missing folder of ``path`` (it is about to be created)."""
    top = None
    path = path.absolute()
    while not path.exists():
        top, path = path, path.parent
    if top is not None:
        _NEW_DIRS.append(top)


def _short_error(err: OSError, command_line: bool) -> None:
    """Missing data or a failed download: remove the empty folders the run created, then on the command line
    print the message as one line (exit status 1) instead of a traceback; ``main(args)`` callers get the exception."""
    from hopformer.data.errors import remove_if_created_empty

    for folder in _NEW_DIRS:
        remove_if_created_empty(folder, existed=False)
    _NEW_DIRS.clear()
    if not command_line:
        raise err
    print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
    raise SystemExit(1) from None


def _plain_progress() -> ProgressBar:
    from hopformer.training.progress import PlainProgressBar

    return PlainProgressBar()


def _prediction_writer() -> BasePredictionWriter:
    from hopformer.training.predictions import PredictionWriter

    return PredictionWriter()


_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_TOP_LEVEL = ("-h", "--help", "--version")


def default_args(argv: list[str]) -> list[str] | None:
    """The arguments for a call without a subcommand (``python train.py [--option value ...]``), else ``None``.

    No arguments, or only options: ``fit`` on ``configs/default.yaml`` then test (as a bare ``python
    train.py``), with the options as overrides; with ``--config`` given, ``fit`` on that config.
    """
    if any(a in _SUBCOMMANDS for a in argv) or any(a in _TOP_LEVEL for a in argv):
        return None
    if any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        return ["fit", *argv]
    if not DEFAULT_CONFIG.is_file():
        raise FileNotFoundError(f"default config not found at '{DEFAULT_CONFIG}'; pass a subcommand and --config")
    return ["fit", "--config", str(DEFAULT_CONFIG), "--test_after_fit", "true", *argv]


def main(args: list[str] | None = None) -> HopformerCLI:
    """Entry point of ``train.py``. Without a subcommand: fit ``configs/default.yaml`` (with any options
    given as overrides) and test the best model."""
    _NEW_DIRS.clear()
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0].startswith("-"):
        rewritten = default_args(argv)
        if rewritten is not None and args is None:
            sys.argv[1:] = rewritten  # the full command (DDP re-launches sys.argv in its worker processes)
        elif rewritten is not None:
            args = rewritten
    filter_known_warnings()
    try:
        cli = HopformerCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
        )
    except (FileNotFoundError, ConnectionError) as err:  # missing data, failed download (DownloadError)
        _short_error(err, command_line=args is None)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # avoids rare aborts at exit under DDP (ENVIRONMENT.md)
    return cli



if __name__ == "__main__":  # python -m hopformer.cli (used by hopformer.compare)
    main()
