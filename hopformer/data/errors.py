"""Errors of the data modules that a user fixes outside Python (network, files): ``train.py`` prints them
as one line instead of a traceback (see ``hopformer.cli.main``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DownloadError", "remove_if_created_empty"]


class DownloadError(ConnectionError, RuntimeError):
    """A data set could not be downloaded (offline, proxy, 404); the message says what to do instead."""


def remove_if_created_empty(folder: Path, existed: bool) -> None:
    """Remove ``folder`` (and the empty folders below it) when this run created it and left no file in it."""
    if existed or not folder.is_dir():
        return
    if any(p.is_file() for p in folder.rglob("*")):
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    folder.rmdir()
