"""``train.py``: the project's LightningCLI (subclass mode for both the model and the data).

    python train.py                                   # fit configs/default.yaml, then test the best checkpoint
    python train.py fit --config configs/<task>/base.yaml [--config configs/<task>/<overlay>.yaml ...]  # any experiment
    python train.py test --config ... --ckpt_path runs/<task>/version_0/checkpoints/best.ckpt
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
- Several ``--config`` files merge in order (a base plus overlays, docs/configs.md). Values the data
  determines are linked into the model (``hopformer/_cli_links.py``): ``input_len``, ``horizon``,
  ``num_series`` (forecasting) and ``num_classes`` (classification).
- ``uhop:``: U-Hop's stage-I callback (``hopformer.training.UHopSeparation``) as its own group, added to
  ``trainer.callbacks`` (``null``, the default: off), so an overlay switches it on without replacing them.
- Checks before any work: the module's ``check_datamodule(datamodule)`` (image size, channels,
  classes); unknown model names and missing data folders fail when the classes are built.
- ``--test_after_fit true``: after ``fit``, validate and test the best checkpoint and print the metrics.
- Run folders: ``version_<n>`` is claimed atomically for every logger configuration (two runs started
  together never share one); ``fit --ckpt_path <root>/version_<n>/checkpoints/last.ckpt`` continues in
  ``version_<n>`` (best path and score reloaded, ``metrics.csv`` appended); ``last.ckpt`` is also saved
  every ``--last_checkpoint_minutes`` (default 10) within an epoch.
- ``--ckpt_path``: explicit ``--model.*`` options win over the checkpoint's hyperparameters; a file that
  is not a checkpoint is named as such.
"""

from __future__ import annotations

import copy
import os
import sys
from datetime import timedelta
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from hopformer._cli_helpers import explicit_options, flat, get, own_error, resolve, set_path
from hopformer._cli_links import add_data_links, check_no_linked_options, keep_link_paths
from hopformer.training.checkpoint_file import check_checkpoint_file
from hopformer.training.run_folder import AppendingCSVLogger, claim_version, version_of_checkpoint

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


def _is_rank_zero() -> bool:
    return rank_zero_only.rank == 0  # set from the launcher's RANK / LOCAL_RANK / SLURM_PROCID before any work


def _run_version(root: str | os.PathLike, resume: int | None) -> int | None:
    """The resumed run's version, else a freshly claimed one (on rank 0; other ranks write no logs)."""
    if resume is not None:
        return resume
    return claim_version(root) if _is_rank_zero() else None


def default_loggers(root: str | os.PathLike, version: int | None = None) -> list[Logger]:
    """A CSV and a TensorBoard logger sharing one ``<root>/version_<n>`` directory.

    ``version=None`` claims a new ``version_<n>`` atomically (:func:`claim_version`); a resumed run
    passes its own version and appends to its ``metrics.csv``.
    """
    version = _run_version(root, version)
    csv = AppendingCSVLogger(save_dir=str(root), name="", version=version)
    tensorboard = TensorBoardLogger(save_dir=str(root), name="", version=csv.version, default_hp_metric=False)
    return [csv, tensorboard]


def _claim_for_user_loggers(loggers: Any, ckpt_path: str | None) -> None:
    """Give a user-configured CSV/TensorBoard logger without a version a claimed (or the resumed) one."""
    for logger in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is None:
            resume = version_of_checkpoint(ckpt_path, logger.root_dir)
            logger._version = _run_version(logger.root_dir, resume)
            if resume is not None and type(logger) is CSVLogger:
                logger.__class__ = AppendingCSVLogger  # Lightning's writer would delete the run's metrics.csv


class HopformerCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # U-Hop's stage I as its own group: `uhop: {class_path: hopformer.training.UHopSeparation, init_args: ...}`
        # (configs/*/uhop.yaml) adds the callback to trainer.callbacks instead of replacing that list; null = off.
        from hopformer.training.two_stage import UHopSeparation

        parser.add_lightning_class_args(UHopSeparation, "uhop", subclass_mode=True, required=False)
        add_data_links(parser)  # input_len, horizon, num_series, num_classes: stated once, on the data side
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
            "--last_checkpoint_minutes",
            type=Optional[float],
            default=10.0,
            help="also save checkpoints/last.ckpt every this many minutes within an epoch, so a run killed "
            "mid-epoch resumes from minutes ago (null or 0: at the end of each epoch only)",
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
        self._raw_args = list(sys.argv[1:] if args is None else args) if not isinstance(args, (dict, Namespace)) else []
        check_no_linked_options(explicit_options(self._raw_args, "model"))
        if args is None:
            return super().parse_arguments(parser, args)
        # An explicit command (tests, hopformer.compare, main(args)) replaces sys.argv, which then belongs to
        # someone else (e.g. pytest): LightningCLI's warning about both being set does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
            return super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model options by the checkpoint's hyperparameters; explicit ``--model.*``
        options on the command line are put back on top (and the options from config files that the
        checkpoint changed are named on stderr), so the run uses, and ``config.yaml`` records, what was asked."""
        sub = self.config.get("subcommand")
        if sub:
            ckpt_path = self.config[sub].get("ckpt_path")
            if ckpt_path and Path(ckpt_path).is_file():  # "last"/"best" and missing files: Lightning's messages
                check_checkpoint_file(ckpt_path, "--ckpt_path")
        before = self.config.clone() if sub else None
        super()._parse_ckpt_path()
        if before is None:
            return
        explicit = explicit_options(getattr(self, "_raw_args", []), "model")
        restored = []
        for key in explicit:
            path = resolve(before[sub], key)
            if path is not None:
                set_path(self.config[sub], path, copy.deepcopy(get(before[sub], path)))
                restored.append(".".join(path))
        old, new = flat(before[sub].get("model"), "model"), flat(self.config[sub].get("model"), "model")
        changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and not any(k == r or k.startswith(r + ".") for r in restored)}
        if changed and _is_rank_zero():
            sys.stderr.write("--ckpt_path: these model options come from the checkpoint, not the config: "
                             + ", ".join(f"{k}={b!r} (config: {a!r})" for k, (a, b) in changed.items()) + "\n")

    def _dump_config(self) -> None:
        super()._dump_config()
        keep_link_paths(self.config_dump)

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
        _note_new_dir(Path(root))  # the run folder is claimed later, when the trainer is built
        _note_new_dir(Path(os.environ["WANDB_DIR"]))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # jsonargparse wraps an error of a model or data class (the classes are Optional, a Union) in a
            # ValueError listing every Union member; re-raise the original, clear message.
            cause = own_error(err)
            if cause is None:
                raise
            cause.hopformer_config_error = True  # main() prints it as one line on the command line
            raise cause from None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        root = trainer_cfg.get("default_root_dir") or "runs"
        # A resumed fit continues in its own run folder (ModelCheckpoint then reloads its best path and score).
        ckpt_path = self._subconfig(self.config).get("ckpt_path") if self.subcommand == "fit" else None
        resume = version_of_checkpoint(ckpt_path, root)
        logger = trainer_cfg.get("logger")
        if trainer_cfg.get("fast_dev_run"):
            pass  # no logs, no checkpoints: nothing to claim
        elif logger in (None, True):
            kwargs["logger"] = default_loggers(root, resume)
        elif logger is False:  # checkpoints and config.yaml go to <root>/version_<n> too, never to a shared <root>
            version = _run_version(root, resume)
            if version is not None:
                kwargs["default_root_dir"] = str(Path(root) / f"version_{version}")
        else:
            _claim_for_user_loggers(logger, ckpt_path)
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
        callbacks = [c for c in callbacks if c is not None]  # `uhop: null` (off)
        _check_one_uhop([*(config.get("callbacks") or []), *callbacks])
        # ModelCheckpoint(save_last=True) refreshes last.ckpt only when a new best is saved; a second
        # checkpoint callback without a monitor keeps last.ckpt at the latest epoch (for resuming).
        # It goes after the "best" one so that trainer.checkpoint_callback (and ckpt_path="best") is the best.
        if config.get("enable_checkpointing", True) is not False:
            last = dict(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
            callbacks = [*callbacks, ModelCheckpoint(**last)]
            minutes = self._subconfig(self.config).get("last_checkpoint_minutes")
            if minutes is not None and minutes > 0:  # also refresh last.ckpt during long epochs
                callbacks.append(ModelCheckpoint(**last, train_time_interval=timedelta(minutes=minutes)))
        else:  # the `checkpoint:` group would contradict enable_checkpointing=false
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def _say_run_folder(self, when: str) -> None:
        """Print where this run writes (logs, config.yaml, checkpoints, predictions), at its start and end."""
        if self.trainer.is_global_zero:
            print(f"{when} {self.subcommand}: run folder {Path(self.trainer.log_dir or self.trainer.default_root_dir).resolve()}",
                  flush=True)

    def _check(self) -> None:
        check = getattr(self.model, "check_datamodule", None)
        if callable(check):
            check(self.datamodule)
        self._say_run_folder("starting")

    def _done(self) -> None:
        self._say_run_folder("finished")

    before_validate = before_test = before_predict = _check
    after_validate = after_test = after_predict = _done

    def before_fit(self) -> None:
        self._check()

    def after_fit(self) -> None:
        if self._subconfig(self.config).get("test_after_fit", False):
            self._test_best()
        self._done()

    def _test_best(self) -> None:
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


def _check_one_uhop(callbacks: list) -> None:
    from hopformer.training.two_stage import UHopSeparation

    if sum(isinstance(c, UHopSeparation) for c in callbacks) > 1:
        raise ValueError("two UHopSeparation callbacks: give U-Hop's stage I once, either as the `uhop:` group "
                         "(configs/*/uhop.yaml, --uhop.*) or in trainer.callbacks, not both")


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


def _short_error(err: Exception, command_line: bool) -> None:
    """Missing data, a failed download or a rejected option: remove the empty folders the run created, then on the command line
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


def main(args: list[str] | None = None, run: bool = True) -> HopformerCLI:
    """Entry point of ``train.py``. Without a subcommand: fit ``configs/default.yaml`` (with any options
    given as overrides) and test the best model."""
    _NEW_DIRS.clear()
    argv = sys.argv[1:] if args is None else list(args)
    if run and (not argv or argv[0].startswith("-")):  # run=False parses without subcommands
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
            run=run,
            auto_configure_optimizers=False,
        )
    except (FileNotFoundError, ConnectionError) as err:  # missing data, failed download (DownloadError)
        _short_error(err, command_line=args is None)
    except (ValueError, TypeError) as err:  # a bad option that a hopformer class rejected while being built
        if not getattr(err, "hopformer_config_error", False):
            raise
        _short_error(err, command_line=args is None)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # avoids rare 'terminate called' aborts at exit under gloo DDP
    return cli


if __name__ == "__main__":  # python -m hopformer.cli (used by hopformer.compare)
    main()
