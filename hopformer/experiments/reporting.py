"""What every experiment (``hopformer.retrieval``, ``hopformer.experiments.*``) shows and writes.

One run layout: ``runs/<job>/<name>/`` (``--name``, default a timestamp; ``--out`` replaces the whole
path), printed when the run starts and when it ends; one ``summary.json`` per run (job, command,
options, wall time, the result tables, the files written); results printed as aligned tables; a
progress bar (tqdm, on stderr) over every long loop.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["run_folder", "format_table", "print_table", "progress", "write_summary", "RunReport"]


def run_folder(job: str, name: str | None = None, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """``out`` if given, else ``root/job/name`` (``name`` defaults to ``YYYYmmdd-HHMMSS``); created."""
    path = Path(out) if out is not None else Path(root) / job / (name or time.strftime("%Y%m%d-%H%M%S"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _cell(value.item(), digits)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """Rows of dicts as an aligned plain-text table (numbers right-aligned, ``digits`` significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c, ""), digits) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in cells)])


def print_table(rows: Sequence[Mapping[str, Any]], title: str | None = None, columns: Sequence[str] | None = None,
                digits: int = 4) -> None:
    """Print :func:`format_table` (with an optional title line) to stdout, flushed."""
    text = format_table(rows, columns, digits)
    print((f"\n{title}\n" if title else "\n") + text, flush=True)


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", disable: bool = False):
    """A tqdm bar on stderr (redrawn in a terminal; one update every 10 s in a log file)."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=interactive,
                mininterval=0.1 if interactive else 10.0, file=sys.stderr)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_summary(out: Path, job: str, options: Mapping[str, Any], results: Mapping[str, Any], seconds: float,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """``out/summary.json``: job, command line, options, wall time, results and every file of the run folder."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "summary.json")
    info = {"job": job, "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "options": _jsonable(dict(options)),
            "seconds": round(seconds, 2), **_jsonable(dict(extra or {})), "results": _jsonable(dict(results)),
            "files": files}
    path = out / "summary.json"
    path.write_text(json.dumps(info, indent=2))
    return path


class RunReport:
    """Start/end lines of a run: ``RunReport(job, out)`` prints the folder; ``finish(...)`` writes the summary."""

    def __init__(self, job: str, out: Path) -> None:
        self.job, self.out, self.start = job, out, time.perf_counter()
        print(f"{job}: run folder {out}", flush=True)

    def finish(self, options: Mapping[str, Any], results: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
        seconds = time.perf_counter() - self.start
        path = write_summary(self.out, self.job, options, results, seconds, extra)
        print(f"{self.job}: done in {seconds:.0f} s; results in {self.out} (summary: {path.name})", flush=True)
        return path
