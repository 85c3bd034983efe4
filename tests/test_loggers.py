"""Tests for notebook_fabric.loggers: real files on disk, read back by value."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from notebook_fabric.loggers import CSVLogger, Logger, TensorBoardLogger
from notebook_fabric.loggers.base import normalize_metrics, sanitize_params

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def read_hparams(log_dir):
    yaml_path, json_path = Path(log_dir, "hparams.yaml"), Path(log_dir, "hparams.json")
    try:
        import yaml
    except ImportError:
        assert not yaml_path.exists()
        return json.loads(json_path.read_text())
    assert not json_path.exists()
    return yaml.safe_load(yaml_path.read_text())


def event_accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# --------------------------------------------------------------------------- base


def test_logger_is_abstract_and_minimal_subclass_works():
    with pytest.raises(TypeError):
        Logger()

    class ListLogger(Logger):
        name, version = "mem", 0

        def __init__(self):
            self.rows = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, normalize_metrics(metrics)))

        def log_hyperparams(self, params):
            pass

    lg = ListLogger()
    lg.log_metrics({"a": torch.tensor(2.0)}, step=1)
    lg.finalize("success")
    assert lg.rows == [(1, {"a": 2.0})]
    assert lg.root_dir is None and lg.log_dir is None


def test_normalize_metrics_conversions():
    out = normalize_metrics(
        {"t": torch.tensor(1.5), "one": torch.tensor([3]), "i": 4, "b": True, "nested": {"x": torch.tensor(2.0)}},
        prefix="val",
    )
    assert out == {"val/t": 1.5, "val/one": 3.0, "val/i": 4, "val/b": 1, "val/nested/x": 2.0}
    assert type(out["val/t"]) is float and type(out["val/one"]) is float
    grad = torch.tensor(0.25, requires_grad=True) * 2
    assert normalize_metrics({"g": grad}) == {"g": 0.5}


def test_sanitize_params():
    assert sanitize_params(
        {"lr": torch.tensor(0.5), "dims": (1, 2), "dir": Path("runs"), "w": torch.ones(2), "obj": object}
    ) == {"lr": 0.5, "dims": [1, 2], "dir": "runs", "w": [1.0, 1.0], "obj": str(object)}


# --------------------------------------------------------------------------- CSV


def test_csv_writes_metrics_and_reads_back(tmp_path):
    logger = CSVLogger(tmp_path, name="exp")
    assert logger.log_dir == str(tmp_path / "exp" / "version_0")
    assert not (tmp_path / "exp").exists()  # nothing touches disk before the first flush
    for step in range(3):
        logger.log_metrics({"loss": 1.0 / (step + 1), "acc": step * 0.25}, step=step * 10)
    logger.finalize("success")

    header, rows = read_csv(tmp_path / "exp" / "version_0" / "metrics.csv")
    assert header == ["acc", "loss", "step"]
    assert [int(r["step"]) for r in rows] == [0, 10, 20]
    assert [float(r["loss"]) for r in rows] == [1.0, 0.5, 1.0 / 3]
    assert [float(r["acc"]) for r in rows] == [0.0, 0.25, 0.5]
    assert logger.metrics_file_path == str(tmp_path / "exp" / "version_0" / "metrics.csv")


def test_csv_versions_auto_increment(tmp_path):
    dirs = []
    for _ in range(3):
        logger = CSVLogger(tmp_path)
        logger.log_metrics({"x": 1.0})
        logger.finalize("success")
        dirs.append(logger.log_dir)
    assert [Path(d).name for d in dirs] == ["version_0", "version_1", "version_2"]
    assert all(Path(d, "metrics.csv").is_file() for d in dirs)
    assert Path(dirs[0]).parent == tmp_path / "notebook_fabric_logs"

    explicit = CSVLogger(tmp_path, version=7)
    explicit.log_metrics({"x": 1.0})
    explicit.save()
    assert explicit.version == 7 and Path(explicit.log_dir).name == "version_7"
    (tmp_path / "notebook_fabric_logs" / "not_a_version").mkdir()
    assert CSVLogger(tmp_path).version == 8

    named = CSVLogger(tmp_path, name="", version="baseline")
    assert named.log_dir == str(tmp_path / "baseline")


def test_csv_new_keys_widen_header(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=1)
    logger.log_metrics({"loss": 1.0}, step=0)
    logger.log_metrics({"loss": 0.5}, step=1)
    assert read_csv(logger.metrics_file_path)[0] == ["loss", "step"]

    logger.log_metrics({"val_acc": 0.9}, step=2)  # new column -> file rewritten
    logger.log_metrics({"loss": 0.25, "lr": 0.1}, step=3)
    header, rows = read_csv(logger.metrics_file_path)
    assert header == ["loss", "lr", "step", "val_acc"]
    assert rows == [
        {"step": "0", "loss": "1.0", "val_acc": "", "lr": ""},
        {"step": "1", "loss": "0.5", "val_acc": "", "lr": ""},
        {"step": "2", "loss": "", "val_acc": "0.9", "lr": ""},
        {"step": "3", "loss": "0.25", "val_acc": "", "lr": "0.1"},
    ]
    assert sorted(os.listdir(logger.log_dir)) == ["metrics.csv"]  # no temp files left behind


def test_csv_converts_tensors(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics(
        {
            "scalar": torch.tensor(0.5),
            "one_elem": torch.tensor([2.0]),
            "int_tensor": torch.tensor(3),
            "grad": torch.tensor(1.5, requires_grad=True) * 1,
            "py_int": 4,
        },
        step=0,
    )
    logger.save()
    _, rows = read_csv(logger.metrics_file_path)
    assert rows == [
        {"step": "0", "scalar": "0.5", "one_elem": "2.0", "int_tensor": "3.0", "grad": "1.5", "py_int": "4"}
    ]


def test_csv_auto_step_and_prefix(tmp_path):
    logger = CSVLogger(tmp_path, prefix="train")
    logger.log_metrics({"loss": 1.0})
    logger.log_metrics({"loss": 2.0})
    logger.log_metrics({"loss": 3.0}, step=10)
    logger.log_metrics({"loss": 4.0})
    logger.log_metrics({"loss": 5.0}, step=torch.tensor(20))
    logger.finalize("success")
    header, rows = read_csv(logger.metrics_file_path)
    assert header == ["step", "train/loss"]
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [
        (0, 1.0), (1, 2.0), (10, 3.0), (11, 4.0), (20, 5.0)
    ]


def test_csv_flushes_every_n_steps(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=3)
    path = Path(logger.metrics_file_path)
    logger.log_metrics({"x": 0.0})
    logger.log_metrics({"x": 1.0})
    assert not path.exists()
    logger.log_metrics({"x": 2.0})
    assert len(read_csv(path)[1]) == 3
    logger.log_metrics({"x": 3.0})
    assert len(read_csv(path)[1]) == 3
    logger.save()
    assert [float(r["x"]) for r in read_csv(path)[1]] == [0.0, 1.0, 2.0, 3.0]
    logger.finalize("success")
    logger.finalize("success")  # idempotent, nothing duplicated
    assert len(read_csv(path)[1]) == 4


def test_csv_existing_version_warns_and_starts_anew(tmp_path):
    """As in Lightning: a version folder that already holds metrics.csv is announced, and replaced by
    the first write (until then the old file stays)."""
    first = CSVLogger(tmp_path, version=0)
    first.log_metrics({"loss": 1.0}, step=0)
    first.finalize("success")
    with pytest.warns(UserWarning, match="exists and is not empty"):
        second = CSVLogger(tmp_path, version=0)
    assert read_csv(second.metrics_file_path)[1] == [{"loss": "1.0", "step": "0"}]
    second.log_metrics({"acc": 0.5}, step=1)
    second.finalize("success")
    header, rows = read_csv(second.metrics_file_path)
    assert header == ["acc", "step"]
    assert rows == [{"acc": "0.5", "step": "1"}]


def test_csv_columns_sorted_by_name_and_buffer_visible(tmp_path):
    """Lightning's column order (every name and ``step``, sorted), also when a later save widens the header;
    ``experiment.metrics`` holds the rows not yet written."""
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=10)
    for metrics in ({"c": 0.1}, {"c": 0.2}, {"b": 0.3}, {"a": 0.4}):
        logger.log_metrics(metrics)
    assert [row["step"] for row in logger.experiment.metrics] == [0, 1, 2, 3]
    logger.save()
    assert logger.experiment.metrics == []
    logger.log_metrics({"d": 0.5})
    logger.save()
    header, rows = read_csv(logger.metrics_file_path)
    assert header == ["a", "b", "c", "d", "step"]
    assert [row["step"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert rows[3] == {"a": "0.4", "b": "", "c": "", "d": "", "step": "3"}


def test_csv_flushing_goes_through_save(tmp_path):
    """Every ``flush_logs_every_n_steps`` rows the logger calls its own ``save()`` (a subclass overriding it sees them)."""
    saved = []

    class Recording(CSVLogger):
        def save(self) -> None:
            saved.append(len(self.metrics))
            super().save()

    logger = Recording(tmp_path, flush_logs_every_n_steps=2)
    for step in range(5):
        logger.log_metrics({"x": float(step)}, step=step)
    assert saved == [2, 2]
    assert len(read_csv(logger.metrics_file_path)[1]) == 4


def test_csv_hyperparams(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.01, "model": {"depth": 4, "act": "relu"}, "dims": (8, 16)})
    logger.log_hyperparams(Namespace(batch_size=32, lr=torch.tensor(0.5), out=Path("ckpt")))
    assert read_hparams(logger.log_dir) == {
        "lr": 0.5,
        "model": {"depth": 4, "act": "relu"},
        "dims": [8, 16],
        "batch_size": 32,
        "out": "ckpt",
    }
    assert logger.hparams["batch_size"] == 32
    assert not Path(logger.metrics_file_path).exists()


def test_csv_pickle_roundtrip(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"a": 1.0}, step=0)
    clone = pickle.loads(pickle.dumps(logger))
    assert clone.log_dir == logger.log_dir
    logger.save()
    clone.log_metrics({"b": 2.0}, step=1)
    clone.save()
    header, rows = read_csv(logger.metrics_file_path)
    assert header == ["a", "b", "step"]
    assert [r["step"] for r in rows] == ["0", "1"]


def test_csv_errors(tmp_path):
    logger = CSVLogger(tmp_path)
    with pytest.raises(ValueError, match=r"'weights'.*shape \(3,\)"):
        logger.log_metrics({"loss": 1.0, "weights": torch.ones(3)})
    with pytest.raises(ValueError, match="'val/emb'"):
        logger.log_metrics({"val": {"emb": torch.zeros(2, 2)}})
    with pytest.raises(TypeError, match="'name'.*str"):
        logger.log_metrics({"name": "resnet"})
    with pytest.raises(ValueError, match="reserved"):
        logger.log_metrics({"step": 3})
    with pytest.raises(TypeError, match="step"):
        logger.log_metrics({"loss": 1.0}, step=1.5)
    with pytest.raises(TypeError, match="mapping"):
        logger.log_metrics([("loss", 1.0)])
    with pytest.raises(TypeError, match="Namespace"):
        logger.log_hyperparams(["lr", 0.1])
    with pytest.raises(ValueError, match="flush_logs_every_n_steps"):
        CSVLogger(tmp_path, flush_logs_every_n_steps=0)
    with pytest.raises(ValueError, match="version"):
        CSVLogger(tmp_path, version=-1)
    # failed calls logged nothing and did not advance the step counter
    logger.log_metrics({"loss": 1.0})
    logger.save()
    assert read_csv(logger.metrics_file_path)[1] == [{"step": "0", "loss": "1.0"}]


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_read_back(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    assert logger.log_dir == str(tmp_path / "tb" / "version_0")
    assert not (tmp_path / "tb").exists()  # writer is created lazily
    for step in range(4):
        logger.log_metrics({"loss": torch.tensor(1.0 / (step + 1)), "lr": 0.1}, step=step * 5)
    logger.log_metrics({"loss": 0.125})  # auto step: 16
    logger.finalize("success")

    files = [f for f in os.listdir(logger.log_dir) if f.startswith("events.out.tfevents")]
    assert files
    acc = event_accumulator(logger.log_dir)
    assert {"loss", "lr"} <= set(acc.Tags()["scalars"])
    got = scalars(acc, "loss")
    assert [s for s, _ in got] == [0, 5, 10, 15, 16]
    assert [v for _, v in got] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.125])
    assert scalars(acc, "lr") == [(s, pytest.approx(0.1)) for s in (0, 5, 10, 15)]


def test_tensorboard_dict_values_use_add_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path, prefix="metrics")
    logger.log_metrics({"acc": {"train": 0.8, "val": torch.tensor(0.7)}}, step=3)
    logger.finalize("success")
    # SummaryWriter.add_scalars writes one run folder per inner key: <main_tag with / -> _>_<key>
    train = event_accumulator(Path(logger.log_dir, "metrics_acc_train"))
    val = event_accumulator(Path(logger.log_dir, "metrics_acc_val"))
    assert scalars(train, "metrics/acc") == [(3, pytest.approx(0.8))]
    assert scalars(val, "metrics/acc") == [(3, pytest.approx(0.7))]


def test_tensorboard_hyperparams(tmp_path):
    from tensorboard.plugins.hparams import metadata as hp_metadata

    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.01, "opt": {"name": "adam"}, "layers": [2, 3], "amp": True})
    logger.log_metrics({"hp_metric": 0.9}, step=10)
    logger.finalize("success")

    acc = event_accumulator(logger.log_dir)
    assert scalars(acc, "hp_metric") == [(0, -1.0), (10, pytest.approx(0.9))]
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    ssi = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    assert ssi.hparams["lr"].number_value == pytest.approx(0.01)
    assert ssi.hparams["opt/name"].string_value == "adam"
    assert ssi.hparams["layers"].string_value == "[2, 3]"
    assert ssi.hparams["amp"].number_value == 1  # torch's hparams() stores bools as numbers
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ["hp_metric"]
    assert read_hparams(logger.log_dir) == {"lr": 0.01, "opt": {"name": "adam"}, "layers": [2, 3], "amp": True}


def test_tensorboard_hyperparams_without_default_metric(tmp_path):
    logger = TensorBoardLogger(tmp_path, default_hp_metric=False)
    logger.log_hyperparams(Namespace(lr=0.1))
    logger.log_hyperparams({"wd": 0.0}, metrics={"val/loss": torch.tensor(2.0)})
    logger.finalize("success")
    acc = event_accumulator(logger.log_dir)
    assert "hp_metric" not in acc.Tags()["scalars"]
    assert scalars(acc, "val/loss") == [(0, 2.0)]


def test_tensorboard_versions_sub_dir_and_experiment(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    first = TensorBoardLogger(tmp_path, name="runs")
    first.log_metrics({"x": 1.0})
    first.finalize("success")
    second = TensorBoardLogger(tmp_path, name="runs", sub_dir="fold_1", flush_secs=5)
    assert second.version == 1
    assert second.log_dir == str(tmp_path / "runs" / "version_1" / "fold_1")
    writer = second.experiment
    assert isinstance(writer, SummaryWriter) and second.experiment is writer
    assert writer.log_dir == second.log_dir
    second.save()
    second.finalize("success")
    assert second._experiment is None
    second.log_metrics({"x": 2.0}, step=1)  # reopens lazily after finalize
    second.finalize("success")
    assert scalars(event_accumulator(second.log_dir), "x") == [(1, 2.0)]
    assert TensorBoardLogger(tmp_path, name="runs", version="custom").log_dir == str(tmp_path / "runs" / "custom")


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_tensorboard_log_graph(tmp_path):
    """As in Lightning: no example input is a warning (nothing logged), and the module ``fabric.setup()``
    returned is traced as the user's module."""
    from notebook_fabric import Fabric

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    logger = TensorBoardLogger(tmp_path)
    with pytest.warns(UserWarning, match="example_input_array"):
        logger.log_graph(model)
    with pytest.warns(UserWarning, match="a list, which TensorBoard cannot trace"):
        logger.log_graph(model, [torch.zeros(2, 4)])
    assert logger._experiment is None  # nothing was written
    wrapped = Fabric(accelerator="cpu", devices=1).setup(model)
    model.example_input_array = torch.zeros(2, 4)
    logger.log_graph(wrapped)  # the example input is found through the wrapper
    logger.finalize("success")
    acc = event_accumulator(logger.log_dir)
    assert acc.Tags()["graph"] is True
    nodes = [node.name for node in acc.Graph().node]
    assert any("Linear" in name for name in nodes)
    assert not any("_FabricModule" in name or "_forward_module" in name for name in nodes), nodes


def test_tensorboard_errors_and_pickle(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(ValueError, match="'emb'"):
        logger.log_metrics({"emb": torch.zeros(4)})
    with pytest.raises(TypeError, match="log_dir"):
        TensorBoardLogger(tmp_path, log_dir="elsewhere")
    logger.log_metrics({"a": 1.0}, step=0)
    clone = pickle.loads(pickle.dumps(logger))  # live SummaryWriter is not pickled
    assert clone._experiment is None and clone.log_dir == logger.log_dir
    logger.finalize("success")
    clone.log_metrics({"a": 2.0}, step=1)
    clone.finalize("success")
    assert scalars(event_accumulator(logger.log_dir), "a") == [(0, 1.0), (1, 2.0)]


def test_package_imports_without_tensorboard(tmp_path):
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class BlockTensorBoard(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tensorboard" or name.startswith("tensorboard."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, BlockTensorBoard())
        from notebook_fabric.loggers import CSVLogger, Logger, TensorBoardLogger
        CSVLogger(sys.argv[1]).log_metrics({"x": 1.0})
        try:
            TensorBoardLogger(sys.argv[1])
        except ImportError as err:
            print("IMPORT-ERROR:", err)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "IMPORT-ERROR:" in proc.stdout
    assert "pip install 'notebook-fabric[tensorboard]'" in proc.stdout
    assert not any(tmp_path.iterdir())  # failed construction created nothing
