"""Every shell command of README.md and docs/*.md (```bash blocks) runs exactly as written.

The commands are collected when the tests are collected (so a changed README is tested as it is), and
each runs with ``bash`` from one temporary copy of the repository per document, in document order (a
command may use what an earlier one wrote, e.g. ``runs/default/version_0/checkpoints/last.ckpt``).
The copy sits beside a link ``../shared`` to the real ``../shared`` when that exists, as in the layout
the docs assume. ``python`` is this interpreter's environment and imports the copy's ``hopformer``.

Tiers (first rule that applies):

- skipped, with the reason printed (``pytest -ra``): placeholders (``<ckpt>``), Docker, GPUs/multi-node
  launchers without a GPU, package installs, the test suite itself, downloads, data that is not there,
  output of an earlier command that did not run;
- skipped unless ``HOPFORMER_DOCS_LONG=1`` (and ``slow``): hours on a CPU (image-data training without a
  GPU, ``--paper``/``--full`` grids);
- unmarked: ``--help`` / ``--print_config`` (seconds);
- ``@pytest.mark.slow``: everything else (minutes each; timeout ``HOPFORMER_DOCS_TIMEOUT``, default 3600 s).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", flags=re.S | re.M)
IMAGE_DATA = re.compile(r"CIFAR10|CIFAR100|TinyImageNet|ImageFolder")


@dataclass(frozen=True)
class DocCommand:
    doc: Path
    line: int
    text: str

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0]
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {first[:60]}"


def _statements(block: str) -> list[tuple[int, str]]:
    """Split a bash block into runnable statements: continuation lines joined, loops kept whole, comments dropped."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    depth, start = 0, 0
    for index, line in enumerate(block.splitlines()):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if not buf:
            start = index
        buf.append(line)
        if stripped.endswith("\\"):
            continue
        depth += len(re.findall(r"(?:^|[;&|]\s*)(?:for|while|until|if)\b", stripped))
        depth -= len(re.findall(r"(?:^|[;&|]\s*)(?:done|fi)\b", stripped))
        if depth <= 0:
            out.append((start, "\n".join(buf)))
            buf, depth = [], 0
    if buf:
        out.append((start, "\n".join(buf)))
    return out


def collect(docs: list[Path] = DOCS) -> list[DocCommand]:
    commands = []
    for doc in docs:
        text = doc.read_text()
        for match in BLOCK.finditer(text):
            first_line = text.count("\n", 0, match.start(1)) + 1
            for offset, statement in _statements(match.group(1)):
                commands.append(DocCommand(doc, first_line + offset, statement))
    return commands


def _words(command: str) -> list[str]:
    """The command's words with ``for v in a b; do ...`` variables replaced by their first value."""
    loop = re.search(r"\bfor\s+(\w+)\s+in\s+([^;\n]+);", command)
    if loop:
        command = re.sub(r"\$\{?" + loop.group(1) + r"\}?", loop.group(2).split()[0], command)
    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return command.split()


def _option(words: list[str], *names: str) -> str | None:
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def _data_problem(words: list[str], repo: Path) -> str | None:
    """Why the command's data are not available (a download or a missing path), else ``None``."""
    if any(w in ("--download",) for w in words) or re.search(r"--data\.(init_args\.)?download\s+true", " ".join(words)):
        return "needs a download (network)"
    config = _option(words, "--config", "-c")
    if config is None or not (repo / config).is_file():
        return None
    data = (yaml.safe_load((repo / config).read_text()) or {}).get("data") or {}
    args = dict(data.get("init_args") or {})
    for key in ("root", "path", "download", "name"):
        value = _option(words, f"--data.init_args.{key}", f"--data.{key}")
        if value is not None:
            args[key] = value
    if str(args.get("download", False)).lower() == "true":
        candidate = repo / str(args.get("root", "data"))
        if not candidate.exists():
            return f"needs a download (download: true, '{args.get('root')}' is not there)"
        return None
    if args.get("path"):
        target = repo / str(args["path"])
    elif args.get("root") and "TimeSeries" in str(data.get("class_path", "")) and args.get("name"):
        target = repo / str(args["root"]) / f"{args['name']}.csv"
    elif args.get("root"):
        target = repo / str(args["root"])
    else:
        return None
    return None if target.exists() else f"needs data at '{os.path.relpath(target, repo)}' (not in this checkout)"


def _is_long(words: list[str], repo: Path) -> str | None:
    import torch

    if "--paper" in words or "--full" in words:
        return "the paper-size grid (hours on a CPU)"
    config = _option(words, "--config", "-c")
    if config and (repo / config).is_file() and not torch.cuda.is_available():
        data = (yaml.safe_load((repo / config).read_text()) or {}).get("data") or {}
        if IMAGE_DATA.search(str(data.get("class_path", ""))):
            return f"trains on image data ({config}): tens of minutes to hours on a CPU"
    return None


@functools.lru_cache(maxsize=1)
def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def classify(command: str, repo: Path) -> tuple[str, str]:
    """``(tier, reason)`` with tier ``skip``, ``long``, ``fast`` or ``slow``."""
    words = _words(command)
    text = " ".join(words)
    if re.search(r"<[^>\s]+>|\.\.\.\.", command):
        return "skip", "a placeholder (<...>) stands for the user's own value"
    if "docker" in words and not _docker_engine():
        return "skip", "needs a running Docker engine"
    import torch

    if not torch.cuda.is_available() and (
        any(w in words for w in ("torchrun", "srun", "sbatch", "--gpus")) or "--trainer.devices -1" in text
    ):
        return "skip", "needs GPUs (or a cluster launcher)"
    if re.search(r"\bpip install\b", text):
        return "skip", "installs packages into the environment (done by .ci/run in a fresh venv)"
    if re.search(r"\bpytest\b", text):
        return "skip", "the test suite itself"
    problem = _data_problem(words, repo)
    if problem:
        return "skip", problem
    for word in words:
        if word.startswith("runs/") and "/checkpoints/" in word and not (repo / word).exists():
            return "skip", f"needs '{word}' from an earlier command that did not run here"
    long = _is_long(words, repo)
    if long:
        return "long", long
    if "--help" in words or "-h" in words or "--print_config" in words:
        return "fast", "seconds"
    return "slow", "minutes"


def _params() -> list:
    params = []
    for command in collect():
        tier, reason = classify(command.text, ROOT)
        if tier == "skip" and reason.startswith("needs 'runs/"):
            tier = "slow"  # an earlier (slow) command of the same document writes it in the copy: decided at run time
        marks = [pytest.mark.slow] if tier in ("slow", "long") else []
        params.append(pytest.param(command, marks=marks, id=command.id))
    return params


@pytest.fixture(scope="session")
def repo_copies(tmp_path_factory):
    """One temporary copy of the repository per document (tracked and untracked-but-not-ignored files)."""
    copies: dict[Path, Path] = {}

    def copy_for(doc: Path) -> Path:
        if doc not in copies:
            base = tmp_path_factory.mktemp(doc.stem)
            dest = base / ROOT.name
            files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.split()
            if files:
                for name in files:
                    if (ROOT / name).is_file():
                        (dest / name).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(ROOT / name, dest / name)
            else:  # not a git checkout
                shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "data", "__pycache__"))
            shared = ROOT.parent / "shared"
            if shared.is_dir():
                (base / "shared").symlink_to(shared, target_is_directory=True)
            copies[doc] = dest
        return copies[doc]

    return copy_for


def test_docs_have_commands():
    commands = collect()
    assert len(commands) >= 10
    assert any(c.text.startswith("python train.py") for c in commands)


def test_statement_splitting():
    block = "# c\npython a.py \\\n  --x 1   # note\nfor v in a b; do\n  echo $v\ndone\n\nls\n"
    assert [s for _, s in _statements(block)] == ["python a.py \\\n  --x 1   # note", "for v in a b; do\n  echo $v\ndone",
                                                  "ls"]
    assert classify("python train.py test --ckpt_path <ckpt>", ROOT)[0] == "skip"
    assert classify("python -m pytest -m 'not slow'", ROOT) == ("skip", "the test suite itself")
    assert classify("python train.py fit --help", ROOT)[0] == "fast"


@pytest.mark.parametrize("command", _params())
def test_doc_command_runs_as_written(command: DocCommand, repo_copies):
    repo = repo_copies(command.doc)
    tier, reason = classify(command.text, repo)  # again: earlier commands may have produced what it needs
    if tier == "skip":
        pytest.skip(f"{command.id}: {reason}")
    if tier == "long" and os.environ.get("HOPFORMER_DOCS_LONG") != "1":
        pytest.skip(f"{command.id}: {reason} (set HOPFORMER_DOCS_LONG=1 to run it)")
    env = {**os.environ, "PYTHONPATH": str(repo), "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "XDG_CACHE_HOME": str(repo.parent / "cache")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")
    timeout = float(os.environ.get("HOPFORMER_DOCS_TIMEOUT", "3600"))
    result = subprocess.run(["bash", "-c", "set -eo pipefail\n" + command.text], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{command.id}\n$ {command.text}\nexit {result.returncode}\n"
                                    f"--- stdout (end)\n{result.stdout[-3000:]}\n--- stderr (end)\n{result.stderr[-3000:]}")
