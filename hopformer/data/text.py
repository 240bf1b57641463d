"""Character-level language modelling on text that ships with Python (no download).

The default corpus is the Python Language Reference as bundled in the standard library
(``pydoc_data.topics``, about 460k characters of English prose and grammar); where a Python build
strips it, the Zen of Python (``this.py``) is used. Characters are ASCII codes (anything else becomes
``"?"``), so the vocabulary is fixed at 128 and decoding is ``chr``.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
from pathlib import Path
from typing import Dict, Literal, Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["ASCII_VOCAB", "CharTextDataModule", "CharWindows", "builtin_text", "decode", "encode"]

ASCII_VOCAB = 128


def builtin_text(source: Literal["python_reference", "zen"] = "python_reference") -> str:
    """A text bundled with Python: the language reference (``pydoc_data.topics``) or the Zen of Python.

    Args:
        source: "python_reference" (falls back to "zen" where the build lacks ``pydoc_data``) or "zen".
    """
    if source not in ("python_reference", "zen"):
        raise ValueError(f"source must be 'python_reference' or 'zen'; got {source!r}")
    if source == "python_reference":
        try:
            from pydoc_data.topics import topics

            return "\n\n".join(topics[k] for k in sorted(topics))
        except ImportError:
            pass
    spec = importlib.util.find_spec("this")  # read the file: importing `this` prints the Zen
    tree = ast.parse(Path(spec.origin).read_text())
    encoded = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "s")
    return codecs.decode(encoded, "rot13")


def encode(text: str) -> Tensor:
    """ASCII codes of ``text`` (other characters become ``"?"``) as a long tensor."""
    return torch.tensor([b for b in text.encode("ascii", errors="replace")], dtype=torch.long)


def decode(ids) -> str:
    """Inverse of :func:`encode` for ids in [0, 128)."""
    return "".join(chr(int(i)) for i in ids)


class CharWindows(Dataset):
    """Consecutive windows of ``seq_len`` characters (stride ``seq_len``) as causal-LM examples.

    Each item is ``{"input_ids": (seq_len,), "labels": (seq_len,)}``; the labels are the inputs
    (Hugging Face causal-LM heads shift them by one internally).
    """

    def __init__(self, ids: Tensor, seq_len: int) -> None:
        if ids.numel() < seq_len:
            raise ValueError(f"the text has {ids.numel()} characters, fewer than seq_len={seq_len}")
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return self.ids.numel() // self.seq_len

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        window = self.ids[i * self.seq_len:(i + 1) * self.seq_len]
        return {"input_ids": window, "labels": window}


class CharTextDataModule(L.LightningDataModule):
    """Character-level LM data: a built-in (or given) text split into train / val / test by position.

    Args:
        source: built-in corpus, see :func:`builtin_text`.
        text_file: a UTF-8 text file to use instead of the built-in corpus.
        max_chars: use only the first ``max_chars`` characters (None: all).
        seq_len: characters per example.
        val_fraction: share of the text (taken from its end, before the test part) for validation.
        test_fraction: share of the text at its very end for testing.
        batch_size: examples per batch.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
    """

    vocab_size = ASCII_VOCAB

    def __init__(
        self,
        source: Literal["python_reference", "zen"] = "python_reference",
        text_file: Optional[str] = None,
        max_chars: Optional[int] = 200_000,
        seq_len: int = 64,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2; got {seq_len!r}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must lie in (0, 1) with a sum below 1; got {val_fraction!r}, {test_fraction!r}"
            )
        if max_chars is not None and max_chars < 10 * seq_len:
            raise ValueError(f"max_chars must be None or at least 10 * seq_len = {10 * seq_len}; got {max_chars!r}")
        if text_file is not None and not Path(text_file).is_file():
            raise FileNotFoundError(f"text_file {text_file!r} does not exist")
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed

    def setup(self, stage: Optional[str] = None) -> None:
        hp = self.hparams
        text = Path(hp.text_file).read_text(encoding="utf-8") if hp.text_file else builtin_text(hp.source)
        ids = encode(text[: hp.max_chars] if hp.max_chars else text)
        n = ids.numel()
        n_test, n_val = int(n * hp.test_fraction), int(n * hp.val_fraction)
        n_train = n - n_val - n_test
        self.train_set = CharWindows(ids[:n_train], self.seq_len)
        self.val_set = CharWindows(ids[n_train:n_train + n_val], self.seq_len)
        self.test_set = CharWindows(ids[n_train + n_val:], self.seq_len)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=g, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size, num_workers=self.num_workers)
