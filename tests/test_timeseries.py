"""Time-series data: split borders, training-only scaling (no leakage), features, clear errors."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hopformer.data.timeseries import TimeSeriesDataModule, split_borders, time_features
from shared_data import SHARED_DATA

ETTH1 = SHARED_DATA / "ett" / "ETTh1.csv"


def write_ett_like(path: Path, rows: int = 17420, seed: int = 0) -> Path:
    """A generated file with ETTh1's layout (hourly dates, 6 loads + OT)."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    cols = {"date": pd.date_range("2016-07-01", periods=rows, freq="h").astype(str)}
    for i, name in enumerate(["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]):
        cols[name] = np.sin(2 * np.pi * t / 24 + i) * (i + 1) + 0.1 * rng.standard_normal(rows) + i
    pd.DataFrame(cols).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def etth1(tmp_path_factory) -> Path:
    return ETTH1 if ETTH1.exists() else write_ett_like(tmp_path_factory.mktemp("ett") / "ETTh1.csv")


def test_split_borders_ett_convention():
    assert split_borders(17420, (8640, 2880, 2880), 96) == [(0, 8640), (8544, 11520), (11424, 14400)]
    # fractions (Crossformer): train/test int(n * frac), validation the rest
    assert split_borders(1000, (0.7, 0.1, 0.2), 10) == [(0, 700), (690, 800), (790, 1000)]


def test_etth1_windows_start_input_len_before_borders(etth1):
    dm = TimeSeriesDataModule("ETTh1", path=str(etth1), input_len=96, horizon=24)
    dm.setup("fit")
    raw = pd.read_csv(etth1).drop(columns="date").to_numpy()
    scaled = dm.scaler.transform(raw)
    assert len(dm.datasets["train"]) == 8640 - 96 - 24 + 1
    assert len(dm.datasets["val"]) == 2880 - 24 + 1
    assert len(dm.datasets["test"]) == 2880 - 24 + 1
    val0, test_last = dm.datasets["val"][0], dm.datasets["test"][len(dm.datasets["test"]) - 1]
    # the first validation target is the first validation row; the last test target ends at row 14400
    np.testing.assert_allclose(val0["y"][0].numpy(), scaled[8640], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(val0["x"][-1].numpy(), scaled[8639], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(test_last["y"][-1].numpy(), scaled[14399], rtol=1e-5, atol=1e-5)
    assert dm.num_series == 7 and dm.columns[-1] == "OT"


def test_scaler_fitted_on_training_rows_only(tmp_path):
    path = write_ett_like(tmp_path / "ETTh1.csv", rows=15000)
    dm = TimeSeriesDataModule("ETTh1", path=str(path), input_len=48, horizon=24)
    dm.setup("fit")
    train_rows = pd.read_csv(path).drop(columns="date").to_numpy()[:8640]
    np.testing.assert_allclose(dm.scaler.mean_, train_rows.mean(0))
    np.testing.assert_allclose(dm.scaler.scale_, train_rows.std(0))
    # changing every row after the training border changes neither the scaler nor the training windows
    df = pd.read_csv(path)
    df.iloc[8640:, 1:] += 1000.0
    leaked = tmp_path / "leaked.csv"
    df.to_csv(leaked, index=False)
    dm2 = TimeSeriesDataModule("custom", path=str(leaked), split=(8640, 2880, 2880), input_len=48, horizon=24)
    dm2.setup("fit")
    np.testing.assert_allclose(dm2.scaler.mean_, dm.scaler.mean_)
    torch.testing.assert_close(dm2.datasets["train"].data, dm.datasets["train"].data)
    assert not torch.allclose(dm2.datasets["test"].data, dm.datasets["test"].data)
    mean, std = dm.target_scale()
    assert mean.shape == (7,) and torch.allclose(mean, torch.as_tensor(train_rows.mean(0), dtype=torch.float32))


@pytest.mark.parametrize("features, c_in, c_out", [("M", 7, 7), ("S", 1, 1), ("MS", 7, 1)])
def test_features_and_time_marks(etth1, features, c_in, c_out):
    dm = TimeSeriesDataModule("ETTh1", path=str(etth1), features=features, input_len=30, horizon=7,
                              time_features=True, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, 30, c_in) and batch["y"].shape == (4, 7, c_out)
    assert batch["x_mark"].shape == (4, 30, 4) and batch["y_mark"].shape == (4, 7, 4)
    assert dm.columns[-1] == "OT"
    if features == "MS":  # the target is the last input column
        item = dm.datasets["val"][0]
        torch.testing.assert_close(item["y"][:, 0], dm.datasets["val"].data[30:37, -1])


def test_time_features_range():
    feats = time_features(pd.date_range("2020-01-01", periods=500, freq="15min"), "t")
    assert feats.shape == (500, 5) and feats.min() >= -0.5 and feats.max() <= 0.5


def test_custom_csv_fraction_split_and_target(tmp_path):
    rows = 400
    df = pd.DataFrame({"date": pd.date_range("2021-01-01", periods=rows, freq="D").astype(str),
                       "a": np.arange(rows, dtype=float), "b": np.cos(np.arange(rows)), "c": np.ones(rows) * 2})
    df.loc[3, "c"] = 3.0
    path = tmp_path / "mine.csv"
    df.to_csv(path, index=False)
    dm = TimeSeriesDataModule("custom", path=str(path), target="a", input_len=20, horizon=5)
    dm.setup("fit")
    assert dm.borders == [(0, 280), (260, 320), (300, 400)]
    assert dm.columns == ["b", "c", "a"]


def test_clear_errors(tmp_path):
    no_date = tmp_path / "no_date.csv"
    pd.DataFrame({"time": ["2020-01-01"] * 50, "x": np.arange(50.0)}).to_csv(no_date, index=False)
    with pytest.raises(ValueError, match="no 'date' column"):
        TimeSeriesDataModule("custom", path=str(no_date), input_len=5, horizon=2).setup()

    text = tmp_path / "text.csv"
    pd.DataFrame({"date": pd.date_range("2020", periods=50, freq="h").astype(str), "x": np.arange(50.0),
                  "label": ["a"] * 50}).to_csv(text, index=False)
    with pytest.raises(ValueError, match=r"non-numeric columns \['label'\]"):
        TimeSeriesDataModule("custom", path=str(text), input_len=5, horizon=2).setup()

    short = tmp_path / "short.csv"
    pd.DataFrame({"date": pd.date_range("2020", periods=100, freq="h").astype(str),
                  "x": np.arange(100.0)}).to_csv(short, index=False)
    with pytest.raises(ValueError, match="longer than the training split"):
        TimeSeriesDataModule("custom", path=str(short), input_len=80, horizon=2).setup()

    with pytest.raises(FileNotFoundError, match="download=True"):
        TimeSeriesDataModule("ETTm2", root=str(tmp_path / "nowhere"), input_len=5, horizon=2).setup()
    with pytest.raises(ValueError, match="name="):
        TimeSeriesDataModule("ETTh9")
    with pytest.raises(ValueError, match="features="):
        TimeSeriesDataModule("ETTh1", features="X")


def _small_csv(path: Path, rows: int = 200, **overrides) -> Path:
    df = pd.DataFrame({"date": pd.date_range("2020", periods=rows, freq="h").astype(str),
                       "x": np.sin(np.arange(rows) / 5.0), "y": np.arange(rows, dtype=float)})
    for key, value in overrides.items():
        df[key] = value
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("split, message", [
    ((0.7, 0.3, 0.2), "sum to 1"),          # the middle fraction used to be ignored (val = the remainder)
    ((0.5, 0.1, 0.2), "sum to 1"),
    ((1.2, -0.1, -0.1), "finite number >= 0"),  # used to report "-20 rows"
    ((0.7, 0.1), "three numbers"),
    ((8640, 0.5, 2880), "not a mix"),
])
def test_split_that_is_not_a_partition_is_rejected(tmp_path, split, message):
    with pytest.raises(ValueError, match=message):
        TimeSeriesDataModule("custom", path=str(_small_csv(tmp_path / "a.csv")), split=split, input_len=5, horizon=2)
    with pytest.raises(ValueError, match=message):
        split_borders(1000, split, 10)


def test_unsorted_dates_are_rejected(tmp_path):
    rows = 200
    dates = pd.date_range("2020", periods=rows, freq="h")[::-1].astype(str)
    path = _small_csv(tmp_path / "reversed.csv", date=dates)
    with pytest.raises(ValueError, match=r"reversed.csv: dates must be sorted.*row 1"):
        TimeSeriesDataModule("custom", path=str(path), input_len=5, horizon=2).setup()


def test_bad_csv_errors_name_the_file_and_column(tmp_path):
    values = np.arange(200, dtype=float)
    values[7] = np.inf
    path = _small_csv(tmp_path / "inf.csv", y=values)
    with pytest.raises(ValueError, match=r"inf.csv: infinite values in columns \['y'\]"):
        TimeSeriesDataModule("custom", path=str(path), input_len=5, horizon=2).setup()
    header = tmp_path / "header.csv"
    header.write_text("date,x,y\n")
    with pytest.raises(ValueError, match=r"header.csv: no data rows"):
        TimeSeriesDataModule("custom", path=str(header), input_len=5, horizon=2).setup()
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.csv: the file is empty"):
        TimeSeriesDataModule("custom", path=str(empty), input_len=5, horizon=2).setup()


@pytest.mark.parametrize("features", ["S", "MS", "M"])
def test_target_scale_is_the_target_columns_training_statistics(tmp_path, features):
    """Expectation from the CSV itself (numpy), not from the function under test: the target's own std."""
    rows = 300
    rng = np.random.default_rng(0)
    path = _small_csv(tmp_path / "t.csv", rows=rows, x=rng.normal(5.0, 1.0, rows), y=rng.normal(-2.0, 7.0, rows),
                      z=rng.normal(40.0, 0.1, rows))
    dm = TimeSeriesDataModule("custom", path=str(path), target="y", features=features, input_len=10, horizon=5)
    mean, scale = dm.target_scale()
    train = pd.read_csv(path).iloc[: int(rows * 0.7)]
    columns = ["x", "z", "y"] if features == "M" else ["y"]
    torch.testing.assert_close(mean, torch.tensor(train[columns].mean().to_numpy(), dtype=torch.float32))
    torch.testing.assert_close(scale, torch.tensor(train[columns].std(ddof=0).to_numpy(), dtype=torch.float32))
