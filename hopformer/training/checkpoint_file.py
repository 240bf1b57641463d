"""Reading a checkpoint file with a message that names it when it is not one."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_checkpoint_file", "read_checkpoint"]


def check_checkpoint_file(path: str | os.PathLike, argument: str) -> None:
    """Raise unless ``path`` exists and looks like ``torch.save`` output (a zip archive, or a legacy pickle).

    ``torch.load`` on any other file suggests ``weights_only=False``, which is the wrong advice for a file
    that is not a checkpoint at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no checkpoint file at '{path}'")
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80":  # the pickle protocol marker of legacy torch.save files
        raise ValueError(f"{argument} '{path}' is not a checkpoint: expected a file written by "
                         f"Trainer.save_checkpoint / torch.save (a zip archive), got {path.stat().st_size} bytes "
                         f"starting with {head!r}")


def read_checkpoint(path: str | os.PathLike, argument: str) -> Any:
    """``torch.load(path)`` (full pickle: the project's own checkpoints) with errors that name the file."""
    check_checkpoint_file(path, argument)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{argument} '{path}' could not be read as a checkpoint (truncated or corrupt?): {err}") from err
