"""Helpers of ``hopformer.cli``: explicit command-line options, config paths, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace

__all__ = ["explicit_options", "resolve", "get", "set_path", "flat", "own_error"]


def explicit_options(args: list[str], group: str) -> list[str]:
    """Dotted keys given as ``--group[.key]`` / ``--group[.key]=value`` on the command line, in order."""
    keys = []
    for token in args:
        name = token.split("=", 1)[0]
        if name == f"--{group}" or name.startswith(f"--{group}."):
            keys.append(name[2:].rstrip("+"))
    return keys


def get(node: Any, path: list[str]) -> Any:
    for part in path:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _has(node: Any, part: str) -> bool:
    return part in node if isinstance(node, dict) else isinstance(node, Namespace) and part in vars(node)


def resolve(config: Any, key: str) -> list[str] | None:
    """The path of ``key`` in ``config``; ``model.x`` may stand for ``model.init_args.x`` (jsonargparse shorthand)."""
    parts = key.split(".")
    for path in (parts, parts[:1] + ["init_args"] + parts[1:]):
        node, ok = config, True
        for part in path:
            if not _has(node, part):
                ok = False
                break
            node = get(node, [part])
        if ok:
            return path
    return None


def _assign(node: Any, key: str, value: Any) -> None:
    if isinstance(node, dict):
        node[key] = value
    else:
        setattr(node, key, value)


def set_path(config: Any, path: list[str], value: Any) -> None:
    parent = config
    for part in path[:-1]:
        child = get(parent, [part])
        if isinstance(child, dict):  # a copy, so that a dict shared with another namespace stays as it was
            child = dict(child)
            _assign(parent, part, child)
        parent = child
    _assign(parent, path[-1], value)


def flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, Namespace):
        node = vars(node)
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in flat(child, f"{prefix}.{key}").items()}
    return {prefix: node}


def _raised_by_hopformer(err: BaseException) -> bool:
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and Path(__file__).resolve().parent in Path(last).resolve().parents


def own_error(err: BaseException) -> BaseException | None:
    """The first error in ``err``'s chain that hopformer raised itself (or a missing file), else None."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, FileNotFoundError) or (cause is not err and _raised_by_hopformer(cause)):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None
