"""Composable configs (docs/configs.md): every old config is one command that resolves to the same values.

``tests/fixtures/old_configs_resolved.json`` is a frozen copy of what each file of the old flat layout
(``git show a08e46f:configs/<name>.yaml``) resolved to with the CLI of that time: every option,
defaults included, flattened to dotted keys; keys equal in all files are stored once under ``common``.
The commands come from the table of docs/configs.md, so the documented command is the tested one.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import lightning as L
import pytest

from hopformer import cli
from hopformer.data import CIFAR10DataModule, CIFAR100DataModule, TinyImageNetDataModule

ROOT = Path(__file__).resolve().parents[1]
OLD = json.loads((ROOT / "tests" / "fixtures" / "old_configs_resolved.json").read_text())
ROW = re.compile(r"^\| `(?P<old>[\w.]+)\.yaml` \| `python train\.py (?P<sub>\w+) (?P<args>[^`]*)` \|$", re.M)
TABLE = {m["old"]: (m["sub"], shlex.split(m["args"])) for m in ROW.finditer((ROOT / "docs" / "configs.md").read_text())}

# The intended differences (docs/configs.md): run roots per base, the data seed follows seed_everything.
IGNORED = {"trainer.default_root_dir", "data.init_args.seed", "config"}
# What the data determines (linked when the classes are built): the old files stated these values.
NUM_CLASSES = {"hopformer.data.CIFAR10DataModule": CIFAR10DataModule.num_classes,
               "hopformer.data.CIFAR100DataModule": CIFAR100DataModule.num_classes,
               "hopformer.data.TinyImageNetDataModule": TinyImageNetDataModule.num_classes,
               "hopformer.data.DigitsDataModule": 10,
               "hopformer.data.ImageFolderDataModule": 10}  # the CIFAR-10 training split as folders
NUM_SERIES = {"ETTh1": 7, "ETTm1": 7, "WTH": 12}  # columns of the CSVs (checked on the real files in test_forecasting)
UHOP = "hopformer.training.UHopSeparation"


class _ParseOnly(cli.HopformerCLI):
    """The project's parser and links, without building any class (fast, no data needed)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse(args: list[str]):
    return _ParseOnly(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      seed_everything_default=0, args=args, run=False, auto_configure_optimizers=False).config


@functools.lru_cache(maxsize=1)
def _parser():
    return _ParseOnly(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      seed_everything_default=0, args=["--config", str(ROOT / "configs" / "default.yaml")], run=False,
                      auto_configure_optimizers=False).parser


def parse_fast(args: list[str]):
    """As :func:`parse`, reusing one parser (building LightningCLI's parser is most of the time)."""
    return _parser().parse_args(args)


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node and not prefix.endswith("_kwargs") and prefix != "uhop":
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: node}


def _normalise(flat: dict) -> dict:
    """The U-Hop callback as the `uhop` group, no empty callback list, the ignored keys dropped."""
    flat = {k: v for k, v in flat.items() if k not in IGNORED}
    callbacks = flat.pop("trainer.callbacks", None) or []
    uhop = [c for c in callbacks if c["class_path"] == UHOP]
    if uhop:
        assert flat.get("uhop") is None, "U-Hop given twice"
        flat["uhop"] = uhop[0]
    flat.setdefault("uhop", None)
    flat["trainer.callbacks"] = [c for c in callbacks if c["class_path"] != UHOP]
    return flat


def _with_data_values(flat: dict) -> dict:
    """Fill in the values that the instantiation links take from the data module."""
    if "model.init_args.num_classes" in flat:
        flat["model.init_args.num_classes"] = NUM_CLASSES[flat["data.class_path"]]
    if "model.init_args.model.init_args.num_series" in flat:
        flat["model.init_args.model.init_args.num_series"] = NUM_SERIES[flat["data.init_args.name"]]
    return flat


def test_the_table_covers_every_old_config():
    assert sorted(TABLE) == sorted(OLD["configs"])


@pytest.mark.parametrize("old", sorted(OLD["configs"]))
def test_the_command_resolves_as_the_old_config(old):
    sub, args = TABLE[old]
    assert sub in ("fit", "test")
    want = _normalise({**OLD["common"], **OLD["configs"][old]})
    got = _normalise(_with_data_values(_flat(parse_fast(args).as_dict())))
    # Every old value is compared; options added since (new parameters with their defaults) are not.
    assert {k: got.get(k, "<missing>") for k in want} == want


def test_a_linked_value_given_on_the_command_line_is_an_error():
    with pytest.raises(ValueError, match=r"--model.init_args.model.init_args.horizon is set from the data .*"
                                         r"change --data.init_args.horizon instead"):
        parse(["--config", str(ROOT / "configs/forecast/base.yaml"), "--model.init_args.model.init_args.horizon", "48"])


def test_the_data_horizon_reaches_the_model():
    cfg = parse(["--config", str(ROOT / "configs/forecast/base.yaml"), "--config", str(ROOT / "configs/forecast/h336.yaml"),
                 "--data.init_args.input_len", "512"])
    model = cfg.model.init_args.model.init_args
    assert (model.horizon, model.input_len, model.num_layers) == (336, 512, 2)


# ----------------------------------------------------------------- building the classes
def _fake_data(tmp_path: Path) -> dict[str, list[str]]:
    """Stand-ins for the data sets that are not in the repository: folders and a CSV, enough to build the classes."""
    folder = tmp_path / "folder"
    for name in "abcdefghij":
        (folder / name).mkdir(parents=True)
    tin = tmp_path / "tin"
    for wnid in ("n01", "n02", "n03"):
        (tin / "train" / wnid / "images").mkdir(parents=True)
    (tin / "val" / "images").mkdir(parents=True)
    (tin / "val" / "val_annotations.txt").write_text("")
    csv = tmp_path / "series.csv"
    rows = ["date," + ",".join(f"c{i}" for i in range(5))]
    rows += [f"2020-01-01 00:00:00,{','.join(str((t * (i + 1)) % 17) for i in range(5))}" for t in range(5000)]
    csv.write_text("\n".join(rows) + "\n")
    return {"ImageFolder": ["--data.init_args.root", str(folder)],
            "TinyImageNet": ["--data.init_args.root", str(tin)],
            "TimeSeries": ["--data.init_args.name", "custom", "--data.init_args.path", str(csv),
                           "--data.init_args.split", "[0.4, 0.3, 0.3]"]}  # room for input 720 + horizon 720


def _build(args: list[str], tmp_path: Path, extra: list[str] = ()) -> cli.HopformerCLI:
    return cli.main([*args, *extra, "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger", "false"],
                    run=False)


# One documented command per config file (test_every_config_file_is_built checks the cover).
BUILT = ["default", "cifar100_sparse_mhm_uhop", "tinyimagenet_mhm_uhop", "cifar10_folder_mhm_patch32",
         "cifar10_folder_mhm_uhop_patch32_authors", "cifar10_sparse_mhm", "vit_small_cifar100", "vit_tiny_uhop_tinyimagenet",
         "vit_tiny_sparse_cifar10", "vit_tiny_entmax_cifar10", "vit_mini_cifar10_cpu_hour", "stanhop_wth_720_uhop",
         "stanhop_ettm1_192", "stanhop_etth1_336", "forecast_dlinear_etth1_96", "forecast_repeat_last_etth1_96",
         "stanhop_etth1_96_plug", "stanhop_etth1_96_tune", "forecast_default", "hf_llama_learnable_alpha_chars"]


def test_every_config_file_is_built():
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    used = {a for old in BUILT for a in TABLE[old][1] if a.startswith("configs/")}
    assert files == used


@pytest.mark.parametrize("old", BUILT)
def test_the_command_builds_its_classes(old, tmp_path):
    if old.startswith("hf_"):
        pytest.importorskip("transformers")
    args = TABLE[old][1]
    fake = _fake_data(tmp_path)
    data = parse_fast(args).data.class_path
    extra = next((v for k, v in fake.items() if k in data), [])
    built = _build(args, tmp_path, extra)
    model = built.model
    if hasattr(model, "num_classes"):
        assert model.num_classes == built.datamodule.num_classes  # linked from the data
    inner = getattr(model, "model", None)
    if getattr(inner, "horizon", None) is not None:
        assert (inner.input_len, inner.horizon) == (built.datamodule.input_len, built.datamodule.horizon)
        if getattr(inner, "num_series", None) is not None:
            assert inner.num_series == built.datamodule.num_series == 5  # the fake CSV's columns


# ----------------------------------------------------------------- the U-Hop group
def _callbacks(built: cli.HopformerCLI) -> list[str]:
    return [type(c).__name__ for c in built.trainer.callbacks]


def test_uhop_overlay_keeps_the_base_early_stopping(tmp_path):
    fake = _fake_data(tmp_path)
    base = ["--config", str(ROOT / "configs/forecast/base.yaml"), *fake["TimeSeries"]]
    plain = _callbacks(_build(base, tmp_path))
    assert "EarlyStopping" in plain and "UHopSeparation" not in plain
    names = _callbacks(_build([*base, "--config", str(ROOT / "configs/forecast/uhop.yaml")], tmp_path))
    assert names.count("EarlyStopping") == 1 and names.count("UHopSeparation") == 1


def test_uhop_overlay_keeps_a_users_callback(tmp_path):
    args = ["--config", str(ROOT / "configs/default.yaml"), "--config", str(ROOT / "configs/vit/uhop.yaml"),
            "--model.init_args.backbone_kwargs", "{attention: kernelized, separation: softmax}",
            "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val_loss"]
    built = _build(args, tmp_path)
    names = _callbacks(built)
    assert names.count("EarlyStopping") == 1 and names.count("UHopSeparation") == 1
    uhop = next(c for c in built.trainer.callbacks if type(c).__name__ == "UHopSeparation")
    assert uhop.steps == 1 and uhop.lr == 0.1


def test_uhop_group_options_and_off(tmp_path):
    default = ["--config", str(ROOT / "configs/default.yaml")]
    built = _build([*default, "--uhop.steps", "3"], tmp_path)
    assert [c.steps for c in built.trainer.callbacks if type(c).__name__ == "UHopSeparation"] == [3]
    assert "UHopSeparation" not in _callbacks(_build([*default, "--uhop", "null"], tmp_path))


def test_uhop_given_twice_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="two UHopSeparation callbacks"):
        _build(["--config", str(ROOT / "configs/default.yaml"), "--trainer.callbacks+=hopformer.training.UHopSeparation"],
               tmp_path)
