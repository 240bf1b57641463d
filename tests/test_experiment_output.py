"""Experiments' output: tables, help for every option with the expected time, one run layout and summary."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from hopformer.experiments import continuous_memory, sequence_memory
from hopformer.experiments.reporting import format_table, run_folder
from hopformer.retrieval import __main__ as retrieval_main


def test_format_table_aligns_columns_and_formats_numbers():
    text = format_table([{"model": "mhm", "error": 1.23456789, "n": 10}, {"model": "uhop", "error": 0.5, "n": 200}])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "error", "n"]
    assert lines[2].split() == ["mhm", "1.235", "10"] and lines[3].split() == ["uhop", "0.5", "200"]
    assert len({len(line) for line in lines[1:]}) == 1  # numbers right-aligned to the same width
    assert format_table([]) == "(no rows)"


def test_run_folder_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_folder("retrieval", "digits") == tmp_path.joinpath("runs", "retrieval", "digits").relative_to(tmp_path)
    stamped = run_folder("sequence_memory")
    assert stamped.parent.as_posix() == "runs/sequence_memory" and re.fullmatch(r"\d{8}-\d{6}", stamped.name)
    assert run_folder("x", "y", out=tmp_path / "custom") == tmp_path / "custom" and (tmp_path / "custom").is_dir()


@pytest.mark.parametrize("build", [retrieval_main.build_parser, continuous_memory.build_parser,
                                   sequence_memory.build_parser], ids=["retrieval", "continuous", "sequence"])
def test_every_option_has_help_and_the_expected_time_is_stated(build):
    parser = build()
    missing = [a.option_strings for a in parser._actions
               if a.option_strings and not a.help and not isinstance(a, argparse._HelpAction)]
    assert missing == []
    assert "Expected time" in parser.format_help()
    assert "--name" in parser.format_help()


def test_experiment_prints_run_folder_tables_and_writes_one_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = continuous_memory.main(["--lengths", "32", "--num-basis", "8", "--sets", "1", "--queries", "8", "--noise", "1",
                                  "--sources", "synthetic", "--name", "short", "--no-progress"])
    assert out == tmp_path.joinpath("runs", "continuous_memory", "short").relative_to(tmp_path)
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == f"continuous_memory: run folder {out}"
    assert lines[-1].startswith("continuous_memory: done in") and str(out) in lines[-1]
    assert "{" not in printed and "continuous_mean" in printed  # a table, not dicts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"] == "continuous_memory" and summary["options"]["lengths"] == [32]
    assert isinstance(summary["results"]["retrieval"][0]["continuous_mean"], float)
    assert "retrieval.csv" in summary["files"] and summary["seconds"] >= 0
