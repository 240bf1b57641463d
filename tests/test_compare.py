"""The comparison tool: statistics, metric reading and one real run through the CLI."""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from hopformer.compare import main, read_metric, summarise, t_interval

ROOT = Path(__file__).resolve().parents[1]


def test_t_interval_matches_student_t():
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.303
    assert mean == 2.0
    assert high - mean == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert mean - low == pytest.approx(high - mean)
    assert all(math.isnan(v) for v in t_interval([1.0])[1:])


def test_read_metric_last_best_and_json(tmp_path):
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,val_acc,train_loss\n0,9,0.5,\n0,9,,1.2\n1,19,0.7,\n2,29,0.6,\n")
    assert read_metric(tmp_path, "val_acc") == 0.6
    assert read_metric(tmp_path, "val_acc", "best", "max") == 0.7
    assert read_metric(tmp_path, "val_acc", "best", "min") == 0.5
    assert read_metric(tmp_path, "missing") is None
    (run / "test_metrics.json").write_text(json.dumps({"val_acc": 0.99}))
    assert read_metric(tmp_path, "val_acc") == 0.99
    with pytest.raises(ValueError, match="reduce"):
        read_metric(tmp_path, "val_acc", "mean")


def test_summarise_pairs_by_seed():
    records = [{"arm": a, "seed": s, "wall_s": 1.0, "m": v}
               for a, vals in (("a", [1.0, 2.0, 3.0]), ("b", [1.5, 2.4, 3.7])) for s, v in enumerate(vals)]
    rows = {r["arm"]: r for r in summarise(records, ["a", "b"], ["m"])}
    assert rows["a"]["mean"] == 2.0 and math.isnan(rows["a"]["diff_vs_a"])
    diffs = [0.5, 0.4, 0.7]
    mean, low, high = t_interval(diffs)
    assert rows["b"]["diff_vs_a"] == pytest.approx(mean)
    assert (rows["b"]["ci95_low"], rows["b"]["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    assert rows["b"]["std"] == pytest.approx(1.1060, abs=1e-3)


def _compare(tmp_path, seeds, arms):
    args = ["--name", "t", "--out", str(tmp_path), "--metric", "val_acc", "--threads", "1", "--seeds", *seeds,
            "--common", "--trainer.max_epochs 1 --trainer.limit_train_batches 3 "
                        "--trainer.limit_val_batches 1 --trainer.enable_progress_bar false"]
    for name, extra in arms:
        args += ["--arm", name, "fit --config configs/default.yaml " + extra]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return main(args)
    finally:
        os.chdir(cwd)


def test_compare_runs_train_py_and_writes_reports(tmp_path):
    rows = _compare(tmp_path, ["0"], [("base", "")])
    assert rows[0]["n"] == 1 and 0.0 <= rows[0]["mean"] <= 1.0
    for name in ("runs.csv", "summary.csv", "summary.md", "t.png"):
        assert (tmp_path / "t" / name).is_file()
    # resumable: a finished run is not repeated
    marker = tmp_path / "t" / "base" / "seed_0" / "result.json"
    before = marker.stat().st_mtime
    _compare(tmp_path, ["0"], [("base", "")])
    assert marker.stat().st_mtime == before
    # a finished run copied under another arm name is reused and summarised under the new name
    shutil.copytree(tmp_path / "t" / "base", tmp_path / "t" / "copy")
    rows = {r["arm"]: r for r in _compare(tmp_path, ["0"], [("base", ""), ("copy", "")])}
    assert rows["copy"]["mean"] == rows["base"]["mean"] and rows["copy"]["diff_vs_base"] == 0.0


@pytest.mark.slow
def test_compare_two_arms_two_seeds(tmp_path):
    rows = _compare(tmp_path, ["0", "1"], [("softmax", ""), ("sparse", "--model.init_args.backbone_kwargs.separation sparsemax")])
    sparse = [r for r in rows if r["arm"] == "sparse"][0]
    assert sparse["n"] == 2 and not math.isnan(sparse["ci95_low"])
