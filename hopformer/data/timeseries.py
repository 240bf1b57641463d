"""Time-series forecasting data: ETTh1/ETTh2/ETTm1/ETTm2, WTH and any CSV with a date column.

Splits and scaling follow Informer / Crossformer / STanHop (Zhou et al. 2021; Zhang & Yan 2023; Wu et al. 2024):

- ETTh*: 12 / 4 / 4 months of hourly rows (borders 0 / 8640 / 11520 / 14400);
- ETTm*: the same months in 15-minute rows (borders x 4);
- WTH: 28 / 10 / 10 months of hourly rows;
- any other CSV: 0.7 / 0.1 / 0.2 of the rows (validation gets the remainder).

The scaler is fitted on the training rows only. Validation and test windows start ``input_len`` rows
before their borders, so the first validation target is the first validation row.

Columns are reordered so the target is last (Informer convention): with ``features="MS"`` the
target of a batch is the last input column. A batch is a dict with ``x`` ``(batch, input_len, C)``
and ``y`` ``(batch, horizon, C_out)`` (``C_out = 1`` for "S" and "MS"), plus ``x_mark`` / ``y_mark``
``(batch, length, n_time_features)`` when ``time_features=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from .errors import DownloadError, remove_if_created_empty

__all__ = ["DatasetInfo", "DATASETS", "TimeSeriesDataModule", "WindowDataset", "time_features", "split_borders"]


@dataclass(frozen=True)
class DatasetInfo:
    """Where a public data set lives and how it is split.

    Args:
        url: public download address of the CSV.
        target: default target column.
        split: rows per split (train, val, test) as integers, or fractions of the file.
        freq: "h" (hourly) or "t" (15 minutes), for the time features.
    """

    url: str
    target: str
    split: tuple[float, float, float]
    freq: str


_H = 30 * 24
_ETT = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/{}.csv"
DATASETS: dict[str, DatasetInfo] = {
    "ETTh1": DatasetInfo(_ETT.format("ETTh1"), "OT", (12 * _H, 4 * _H, 4 * _H), "h"),
    "ETTh2": DatasetInfo(_ETT.format("ETTh2"), "OT", (12 * _H, 4 * _H, 4 * _H), "h"),
    "ETTm1": DatasetInfo(_ETT.format("ETTm1"), "OT", (48 * _H, 16 * _H, 16 * _H), "t"),
    "ETTm2": DatasetInfo(_ETT.format("ETTm2"), "OT", (48 * _H, 16 * _H, 16 * _H), "t"),
    "WTH": DatasetInfo(
        "https://raw.githubusercontent.com/MAGICS-LAB/STanHop/main/datasets/WTH.csv",
        "WetBulbCelsius",
        (28 * _H, 10 * _H, 10 * _H),
        "h",
    ),
}


def check_split(split) -> tuple[float, float, float]:
    """``split`` as three row counts (all > 1) or three fractions in [0, 1] that sum to 1; else ``ValueError``."""
    values = tuple(split) if isinstance(split, (tuple, list)) else (split,)
    if len(values) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in values):
        raise ValueError(f"split={split!r}: expected three numbers (train, val, test)")
    if any(not np.isfinite(s) or s < 0 for s in values):
        raise ValueError(f"split={split!r}: every part must be a finite number >= 0")
    if not all(s > 1 for s in values):
        if any(s > 1 for s in values):
            raise ValueError(f"split={split!r}: give three row counts (all > 1) or three fractions (all <= 1), not a mix")
        if abs(sum(values) - 1.0) > 1e-6:
            raise ValueError(f"split={split!r}: fractions must sum to 1, got {sum(values):.6g}")
    return values


def split_borders(n_rows: int, split: tuple[float, float, float], input_len: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` of the train / val / test windows.

    Integer splits are row counts (clipped to the file); fractions (each in [0, 1], summing to 1)
    follow Crossformer: train and test get ``int(n * frac)`` rows, validation the rest. Val/test
    start ``input_len`` rows early.
    """
    split = check_split(split)
    if all(float(s) > 1 for s in split):
        n_train, n_val, n_test = (int(s) for s in split)
    else:
        n_train, n_test = int(n_rows * split[0]), int(n_rows * split[2])
        n_val = n_rows - n_train - n_test
    if n_train + n_val + n_test > n_rows:
        raise ValueError(f"split {split} needs {n_train + n_val + n_test} rows but the file has {n_rows}")
    b1, b2 = n_train, n_train + n_val
    return [(0, b1), (b1 - input_len, b2), (b2 - input_len, b2 + n_test)]


def time_features(dates: pd.DatetimeIndex, freq: str = "h") -> np.ndarray:
    """Calendar features scaled to [-0.5, 0.5] (Informer's ``timeenc=1``), ``(rows, 4 or 5)``.

    Hour of day, day of week, day of month, day of year; plus minute of hour for ``freq="t"``.
    """
    feats = [
        dates.hour / 23.0 - 0.5,
        dates.dayofweek / 6.0 - 0.5,
        (dates.day - 1) / 30.0 - 0.5,
        (dates.dayofyear - 1) / 365.0 - 0.5,
    ]
    if freq == "t":
        feats.insert(0, dates.minute / 59.0 - 0.5)
    return np.stack([np.asarray(f, dtype=np.float32) for f in feats], axis=1)


class WindowDataset(Dataset):
    """Sliding windows over a scaled array: ``x = rows[i : i+L]``, ``y = rows[i+L : i+L+H]``.

    Args:
        data: scaled values ``(rows, C)``.
        input_len: L, rows seen by the model.
        horizon: H, rows to predict.
        out_columns: number of trailing columns that form the target (C for "M", 1 for "S"/"MS").
        marks: optional time features ``(rows, F)``.
    """

    def __init__(
        self, data: np.ndarray, input_len: int, horizon: int, out_columns: int, marks: np.ndarray | None = None
    ) -> None:
        self.data = torch.as_tensor(data, dtype=torch.float32)
        self.marks = None if marks is None else torch.as_tensor(marks, dtype=torch.float32)
        self.input_len, self.horizon, self.out_columns = input_len, horizon, out_columns

    def __len__(self) -> int:
        return max(len(self.data) - self.input_len - self.horizon + 1, 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mid, end = i + self.input_len, i + self.input_len + self.horizon
        item = {"x": self.data[i:mid], "y": self.data[mid:end, -self.out_columns :]}
        if self.marks is not None:
            item["x_mark"], item["y_mark"] = self.marks[i:mid], self.marks[mid:end]
        return item


class TimeSeriesDataModule(L.LightningDataModule):
    """LightningDataModule for ETT, WTH and any CSV with a date column.

    Args:
        name: "ETTh1", "ETTh2", "ETTm1", "ETTm2", "WTH", or "custom" (then ``path`` is required).
        path: CSV file; default ``root/<name>.csv``.
        root: folder for the named data sets (and for downloads).
        download: fetch a missing named data set from its public address (opt-in).
        features: "M" multivariate in and out, "S" target in and out, "MS" all in, target out.
        target: target column (default: OT for ETT, WetBulbCelsius for WTH, last column otherwise).
        input_len: rows of history per window (L).
        horizon: rows to forecast (H).
        split: train/val/test rows (integers) or fractions; default per data set (0.7/0.1/0.2 custom).
        scale: standardise with a scaler fitted on the training rows only.
        time_features: add calendar features ``x_mark`` / ``y_mark`` to each batch.
        freq: "h" or "t" for the time features of a custom file.
        batch_size: training batch size; ``eval_batch_size`` for val/test (default the same).
        num_workers: DataLoader workers.
        seed: seed of the training shuffle; ``None`` (default) follows the global seed
            (``seed_everything``, i.e. ``torch.initial_seed()`` when the loader is built), so runs
            with different seeds see different batch orders and equal seeds the same one.
    """

    def __init__(
        self,
        name: str = "ETTh1",
        path: str | None = None,
        root: str = "data",
        download: bool = False,
        features: Literal["M", "S", "MS"] = "M",
        target: str | None = None,
        input_len: int = 96,
        horizon: int = 96,
        split: tuple[float, float, float] | None = None,
        scale: bool = True,
        time_features: bool = False,
        freq: str = "h",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if name != "custom" and name not in DATASETS:
            raise ValueError(f"name={name!r}: expected one of {sorted(DATASETS)} or 'custom'")
        if name == "custom" and path is None:
            raise ValueError("name='custom' needs path= to a CSV file with a date column")
        if features not in ("M", "S", "MS"):
            raise ValueError(f"features={features!r}: expected 'M', 'S' or 'MS'")
        for arg, value in (("input_len", input_len), ("horizon", horizon), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}={value!r}: expected a positive integer")
        # the shuffle seed is kept out of hparams: Lightning refuses a fit whose module and data module log
        # the same key with different values (ForecastingModule has its own ``seed``)
        self.save_hyperparameters(ignore=["seed"])
        self.seed = seed
        info = DATASETS.get(name)
        self.name, self.features, self.input_len, self.horizon = name, features, input_len, horizon
        self.path = Path(path) if path is not None else Path(root) / f"{name}.csv"
        self.target = target or (info.target if info else None)
        self.split = check_split(split) if split is not None else (info.split if info else (0.7, 0.1, 0.2))
        self.freq = info.freq if info else freq
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.datasets: dict[str, WindowDataset] = {}
        self.scaler: StandardScaler | None = None
        self.columns: list[str] = []

    # ----------------------------------------------------------------- reading
    def prepare_data(self) -> None:
        if self.path.exists():
            return
        info = DATASETS.get(self.name)
        if not self.hparams.download or info is None:
            hint = (f"point --data.init_args.root at the folder holding {self.path.name} (or --data.init_args.path at "
                    f"the file), or pass download=True (--data.init_args.download true) to fetch it from {info.url}"
                    if info else "check --data.init_args.path")
            raise FileNotFoundError(f"{self.name} data not found at {self.path.resolve()}; {hint}")
        existed = self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(info.url, str(self.path), progress=False)
        except Exception as err:  # offline, proxy, 404: say where we looked and what failed
            remove_if_created_empty(self.path.parent, existed)
            raise DownloadError(f"could not download {info.url} to {self.path.resolve()} ({err}); without network, copy "
                                f"{self.path.name} into a folder and point --data.init_args.root at it") from None

    def read_frame(self) -> tuple[pd.DataFrame, pd.DatetimeIndex]:
        """Read and validate the CSV: a date column, numeric columns, no missing values."""
        if not self.path.exists():
            self.prepare_data()
        try:
            df = pd.read_csv(self.path)
        except pd.errors.EmptyDataError as err:
            raise ValueError(f"{self.path}: the file is empty (expected a header with a 'date' column and data rows)") from err
        if "date" not in df.columns:
            raise ValueError(f"{self.path}: no 'date' column (columns: {list(df.columns)}); the first column must be the dates")
        if df.empty:
            raise ValueError(f"{self.path}: no data rows, only the header {list(df.columns)}")
        try:
            dates = pd.DatetimeIndex(pd.to_datetime(df.pop("date")))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.path}: the 'date' column does not parse as dates: {err}") from err
        if not dates.is_monotonic_increasing:
            row = int(np.flatnonzero(np.diff(dates.asi8) < 0)[0]) + 1
            raise ValueError(f"{self.path}: dates must be sorted in time; row {row} ({dates[row]}) comes before "
                             f"row {row - 1} ({dates[row - 1]}). Sort the file by date first")
        bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise ValueError(f"{self.path}: non-numeric columns {bad}; drop or encode them before forecasting")
        if df.isna().any().any():
            raise ValueError(f"{self.path}: missing values in columns {list(df.columns[df.isna().any()])}")
        infinite = [c for c in df.columns if np.isinf(df[c].to_numpy(dtype=np.float64)).any()]
        if infinite:
            raise ValueError(f"{self.path}: infinite values in columns {infinite}")
        target = self.target or df.columns[-1]
        if target not in df.columns:
            raise ValueError(f"target={target!r} is not a column of {self.path} (columns: {list(df.columns)})")
        self.target = target
        df = df[[c for c in df.columns if c != target] + [target]]  # target last
        if self.features != "M":
            df = df[[target]] if self.features == "S" else df
        return df, dates

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        df, dates = self.read_frame()
        values = df.to_numpy(dtype=np.float64)
        borders = split_borders(len(values), self.split, self.input_len)
        n_train = borders[0][1]
        if self.input_len + self.horizon > n_train:
            raise ValueError(
                f"input_len={self.input_len} + horizon={self.horizon} is longer than the training split "
                f"({n_train} rows of {self.path})"
            )
        self.scaler = StandardScaler().fit(values[:n_train])  # training rows only: no leakage
        if self.hparams.scale:
            values = self.scaler.transform(values)
        marks = time_features(dates, self.freq) if self.hparams.time_features else None
        out_columns = values.shape[1] if self.features == "M" else 1
        self.columns = list(df.columns)
        for stage_name, (lo, hi) in zip(("train", "val", "test"), borders):
            ds = WindowDataset(values[lo:hi], self.input_len, self.horizon, out_columns,
                               None if marks is None else marks[lo:hi])
            if len(ds) == 0:
                raise ValueError(
                    f"the {stage_name} split of {self.path} (rows {lo}..{hi}) is too short for "
                    f"input_len={self.input_len} + horizon={self.horizon}"
                )
            self.datasets[stage_name] = ds
        self.borders = borders

    # ----------------------------------------------------------------- facts for the model
    @property
    def num_series(self) -> int:
        """Number of input columns C (after ``features`` selection)."""
        if not self.columns:
            self.setup()
        return len(self.columns)

    def target_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the output columns, to undo the scaling."""
        if self.scaler is None:
            self.setup()
        n_out = self.datasets["train"].out_columns
        mean = torch.as_tensor(self.scaler.mean_[-n_out:], dtype=torch.float32)
        scale = torch.as_tensor(self.scaler.scale_[-n_out:], dtype=torch.float32)
        if not self.hparams.scale:
            mean, scale = torch.zeros_like(mean), torch.ones_like(scale)
        return mean, scale

    # ----------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        seed = self.seed
        if seed is None:  # follow the global seed (seed_everything), independent of how much RNG init used
            seed = torch.initial_seed()
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True, generator=gen,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=self.eval_batch_size, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["test"], batch_size=self.eval_batch_size, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
