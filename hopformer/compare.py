"""Compare training configurations at equal budget over several seeds: ``python -m hopformer.compare``.

    python -m hopformer.compare --name etth1_96 --seeds 0 1 2 --metric test_mse --mode min \\
        --arm dlinear "fit --config configs/forecast/base.yaml --config configs/forecast/dlinear.yaml" \\
        --arm stanhop "fit --config configs/forecast/base.yaml --config configs/forecast/small.yaml" \\
        --common "--trainer.max_epochs 5"

Every run is ``python -m hopformer.cli <arm args> <common args> --seed_everything S
--trainer.default_root_dir OUT/NAME/ARM/seed_S`` in a subprocess. The runs are interleaved (seed 0 of
every arm, then seed 1, ...), so a slow drift of the machine's load affects every arm alike, and a run
whose ``result.json`` exists is not repeated (an interrupted comparison resumes where it stopped).

A metric is read from the ``metrics.csv`` files under the run folder (Lightning's ``CSVLogger``) and
from any ``test_metrics.json`` there: ``--reduce last`` takes the last logged value (the default:
what the run ends with, no selection on the validation data), ``best`` the best by ``--mode``.

The report gives, per metric and arm: mean, sample standard deviation, number of seeds, the paired
difference against the first arm (same seed) with a two-sided 95% Student-t interval, and the mean
wall time per run. Files: ``runs.csv`` (one row per run), ``summary.csv``, ``summary.md`` and a plot
``NAME.png`` in ``OUT/NAME``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["Arm", "read_metric", "summarise", "t_interval", "main"]

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass(frozen=True)
class Arm:
    """One configuration under comparison: a name and the ``train.py`` arguments that run it."""

    name: str
    args: tuple


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and the two-sided 95% Student-t interval ``(mean, low, high)`` of ``values`` (nan when n < 2)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _std(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def read_metric(run_dir: Path, metric: str, reduce: str = "last", mode: str = "max") -> Optional[float]:
    """The value of ``metric`` in a finished run folder, or None when the run never logged it.

    ``test_metrics.json`` files win over ``metrics.csv`` (they hold the final test evaluation). In the
    CSV files (sorted by modification time, rows in order) ``reduce="last"`` takes the last logged value
    and ``reduce="best"`` the maximum (``mode="max"``) or minimum (``mode="min"``)."""
    if reduce not in ("last", "best"):
        raise ValueError(f"reduce must be 'last' or 'best', got {reduce!r}")
    for path in sorted(run_dir.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        data = json.loads(path.read_text())
        if metric in data:
            return float(data[metric])
    values: List[float] = []
    for path in sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                cell = row.get(metric)
                if cell not in (None, ""):
                    values.append(float(cell))
    if not values:
        return None
    if reduce == "last":
        return values[-1]
    return max(values) if mode == "max" else min(values)


def _run(arm: Arm, seed: int, common: Sequence[str], run_dir: Path, threads: int, timeout: float) -> dict:
    """Run one (arm, seed) and return its record (also written to ``run_dir/result.json``)."""
    done = run_dir / "result.json"
    if done.is_file():  # finished earlier (perhaps copied from another comparison): named as in this call
        return {**json.loads(done.read_text()), "arm": arm.name, "seed": seed}
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "hopformer.cli", *arm.args, *common, "--seed_everything", str(seed),
           "--trainer.default_root_dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record = {"arm": arm.name, "seed": seed, "returncode": code, "wall_s": time.perf_counter() - start,
              "command": " ".join(shlex.quote(c) for c in cmd)}
    if code == 0:
        done.write_text(json.dumps(record, indent=2))
    return record


def summarise(records: List[dict], arms: Sequence[str], metrics: Sequence[str]) -> List[dict]:
    """Per metric and arm: mean, std, n, paired difference to the first arm with its 95% interval, wall time."""
    rows = []
    for metric in metrics:
        by_arm: Dict[str, Dict[int, float]] = {a: {} for a in arms}
        walls: Dict[str, List[float]] = {a: [] for a in arms}
        for r in records:
            if r.get(metric) is not None:
                by_arm[r["arm"]][r["seed"]] = r[metric]
                walls[r["arm"]].append(r["wall_s"])
        base = by_arm[arms[0]]
        for arm in arms:
            values = list(by_arm[arm].values())
            paired = [by_arm[arm][s] - base[s] for s in sorted(by_arm[arm]) if s in base]
            diff, low, high = t_interval(paired) if arm != arms[0] else (math.nan,) * 3
            mean = sum(values) / len(values) if values else math.nan
            rows.append({"metric": metric, "arm": arm, "n": len(values), "mean": mean, "std": _std(values),
                         "diff_vs_" + arms[0]: diff, "ci95_low": low, "ci95_high": high,
                         "wall_s": sum(walls[arm]) / len(walls[arm]) if walls[arm] else math.nan})
    return rows


def _markdown(rows: List[dict], baseline: str, title: str) -> str:
    out = [f"### {title}", "", f"| metric | arm | n | mean | std | diff vs {baseline} [95% CI] | wall s/run |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        diff = r["diff_vs_" + baseline]
        ci = "-" if math.isnan(diff) else (
            f"{diff:+.4f}" + ("" if math.isnan(r["ci95_low"]) else f" [{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}]"))
        out.append(f"| {r['metric']} | {r['arm']} | {r['n']} | {r['mean']:.4f} | {r['std']:.4f} | {ci} | {r['wall_s']:.0f} |")
    return "\n".join(out) + "\n"


def _plot(records: List[dict], arms: Sequence[str], metrics: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, arm in enumerate(arms):
            ys = [r[metric] for r in records if r["arm"] == arm and r.get(metric) is not None]
            ax.scatter([i] * len(ys), ys, alpha=0.7)
            if ys:
                ax.hlines(sum(ys) / len(ys), i - 0.25, i + 0.25, color="k")
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hopformer.compare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each run costs what one `python train.py` run of that configuration costs; the total is "
               "(number of arms) x (number of seeds) runs, run one after another.")
    p.add_argument("--name", required=True, help="name of the comparison (folder OUT/NAME)")
    p.add_argument("--arm", nargs=2, action="append", metavar=("NAME", "ARGS"), required=True,
                   help="a configuration: its name and its train.py arguments as one quoted string; the first arm is the baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--metric", action="append", required=True, help="metric to compare (repeatable), e.g. val_acc, test_mse")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="higher or lower is better (for --reduce best)")
    p.add_argument("--reduce", choices=("last", "best"), default="last", help="last logged value (default) or best by --mode")
    p.add_argument("--common", default="", help="train.py arguments added to every arm (quoted string)")
    p.add_argument("--out", default="runs/compare", help="output root (default: runs/compare)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run (default: 2)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is stopped (default: 3600)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = _parser().parse_args(argv)
    names = [name for name, _ in args.arm]
    if len(set(names)) != len(names):
        raise SystemExit(f"--arm names must be distinct, got {names}")
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    arms = [Arm(name, tuple(shlex.split(a))) for name, a in args.arm]
    common = shlex.split(args.common)
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    print(f"comparison '{args.name}': {len(arms)} arms x {len(args.seeds)} seeds -> {out}", flush=True)
    records = []
    for seed in args.seeds:
        for arm in arms:
            run_dir = out / arm.name / f"seed_{seed}"
            record = _run(arm, seed, common, run_dir, args.threads, args.timeout)
            for metric in args.metric:
                record[metric] = read_metric(run_dir, metric, args.reduce, args.mode) if record["returncode"] == 0 else None
            shown = ", ".join(f"{m}={record[m]:.4f}" if record[m] is not None else f"{m}=-" for m in args.metric)
            status = "ok" if record["returncode"] == 0 else f"FAILED ({record['returncode']}; see {run_dir / 'log.txt'})"
            print(f"  seed {seed} {arm.name:<20} {status:<8} {shown}  {record['wall_s']:.0f} s", flush=True)
            records.append(record)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "seed", "returncode", "wall_s", *args.metric, "command"])
        writer.writeheader()
        writer.writerows(records)
    rows = summarise(records, names, args.metric)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = _markdown(rows, names[0], f"{args.name}: seeds {' '.join(map(str, args.seeds))}, {args.reduce} value")
    (out / "summary.md").write_text(table + "\nCommon arguments: `" + args.common + "`\n\n" +
                                    "\n".join(f"- {a.name}: `{' '.join(a.args)}`" for a in arms) + "\n")
    _plot(records, names, args.metric, out / f"{args.name}.png")
    print("\n" + table + f"\nwritten: {out}/runs.csv, summary.csv, summary.md, {args.name}.png", flush=True)
    return rows


if __name__ == "__main__":
    main()
