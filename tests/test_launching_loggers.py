"""Loggers in launched ranks: rows buffered by a logger reach the disk when the rank ends."""
import csv
from pathlib import Path

from notebook_fabric import launch
from notebook_fabric.loggers import CSVLogger


def _log_five(fabric):
    for step in range(5):
        fabric.log("loss", 1.0 / (step + 1), step=step)
    return fabric.global_rank


def test_csv_rows_logged_on_rank_zero_are_flushed_when_the_launch_ends(tmp_path: Path) -> None:
    assert launch(_log_five, devices=2, accelerator="cpu", loggers=[CSVLogger(tmp_path)]) == 0
    files = list(tmp_path.rglob("metrics.csv"))
    assert len(files) == 1, "only rank 0 logs, into one version folder"
    rows = list(csv.DictReader(files[0].open()))
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3, 4]
    assert float(rows[-1]["loss"]) == 0.2
