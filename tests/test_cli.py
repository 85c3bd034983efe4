"""`notebook-fabric run`: flags, refusals, the settings hand-over, and real jobs through torchrun."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from notebook_fabric import cli
from notebook_fabric.cli_settings import apply_cli_settings, env_name, export_cli_settings, parse_devices
from notebook_fabric.environments import find_free_port
from support.processes import kill_and_reap
from support.waiting import poll, wait_until

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
ALLREDUCE = str(SCRIPTS / "cli_allreduce.py")
FLAGS = ("--accelerator", "--strategy", "--devices", "--num-nodes", "--node-rank", "--main-address",
         "--main-port", "--precision")  # fmt: skip
_INHERITED_PREFIXES = ("NOTEBOOK_FABRIC_", "TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "MV2_")
_INHERITED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")
_MARKER = "NOTEBOOK_FABRIC_CLI_TEST_JOB"
DEFAULTS = {"accelerator": "auto", "strategy": "auto", "devices": "auto", "num_nodes": 1, "precision": "32-true"}


# ----- helpers ------------------------------------------------------------------------------------
def command() -> list[str]:
    """The installed `notebook-fabric` console script, or the same entry point run by this Python."""
    installed = shutil.which("notebook-fabric", path=os.path.dirname(sys.executable))
    if installed:
        return [installed]
    return [sys.executable, "-c", "import sys; from notebook_fabric.cli import main; sys.exit(main())"]


def job_environment(marker: str = "") -> dict[str, str]:
    """This environment minus any rank/scheduler variables, with the repository importable.

    Every process of the job inherits ``marker`` in its environment, so survivors can be found.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES) and k not in _INHERITED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env[_MARKER] = marker or uuid.uuid4().hex
    return env


def start(*arguments: str, module: bool = False, marker: str = "") -> subprocess.Popen:
    prefix = [sys.executable, "-m", "notebook_fabric"] if module else command()
    return subprocess.Popen(
        [*prefix, "run", *arguments], env=job_environment(marker), cwd=str(REPO), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _describe_tree(process.pid)
        _kill_tree(process.pid)
        out, err = process.communicate()
        pytest.fail(f"notebook-fabric run did not finish in {timeout}s; its processes:\n{tree}\n{out}\n{err}")
    return process.returncode, out, err


def _describe_tree(pid: int) -> str:
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return "\n".join(f"  {p.pid} {p.status()} {' '.join(p.cmdline())[:160]}" for p in processes)
    except psutil.Error:
        return "  (gone)"


def _kill_tree(pid: int) -> None:
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    kill_and_reap(processes)


def survivors(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (re-parented orphans included)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.status() != psutil.STATUS_ZOMBIE \
                    and process.environ().get(_MARKER) == marker:
                found.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return found


def results(out: str) -> list[dict[str, str]]:
    """The RESULT lines of cli_allreduce.py as dicts, sorted by global rank."""
    rows = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda row: int(row["global_rank"]))


@pytest.fixture
def clean_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CLI settings or RANK while the test runs; the environment is restored afterwards."""
    for name in list(os.environ):
        if name.startswith("NOTEBOOK_FABRIC_") or name == "RANK":
            monkeypatch.delenv(name)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ----- the parser ---------------------------------------------------------------------------------
def test_help_lists_every_flag() -> None:
    process = subprocess.run([sys.executable, "-m", "notebook_fabric", "run", "--help"], env=job_environment(),
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("usage: notebook-fabric run")
    for flag in FLAGS:
        assert flag in process.stdout
    assert "SCRIPT ARGS" in process.stdout


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp_spawn", "DDP_SPAWN", "dp"])
def test_strategies_that_start_their_own_processes_are_refused(
    strategy: str, capsys: pytest.CaptureFixture, clean_settings: None
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--strategy", strategy, ALLREDUCE])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--strategy {strategy}" in error and "Use --strategy ddp" in error
    assert env_name("strategy") not in os.environ  # refused before anything was exported


def test_refusal_exits_non_zero_from_the_command_line() -> None:
    process = subprocess.run([*command(), "run", "--strategy", "ddp_notebook", ALLREDUCE], env=job_environment(),
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert process.returncode == 2
    assert "--strategy ddp_notebook starts its own processes" in process.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--num-nodes", "2", "--node-rank", "2"], r"--node-rank 2 is outside 0..1 \(--num-nodes 2\)"),
        (["--num-nodes", "0"], r"--num-nodes 0 must be at least 1"),
        (["--main-port", "70000"], r"--main-port 70000 is not a TCP port"),
        (["--precision", "8-bit"], r"--precision 8-bit: precision='8-bit' is not supported"),
        (["--devices", "two"], r"--devices two: devices='two' is not understood"),
        (["--devices", "0"], r"--devices 0: devices=0 must be at least 1"),
    ],
)
def test_bad_flags_name_the_flag(arguments: list[str], message: str, capsys: pytest.CaptureFixture, clean_settings: None) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--accelerator", "cpu", *arguments, ALLREDUCE])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_script(capsys: pytest.CaptureFixture, clean_settings: None) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "no_such_script.py"])
    assert "SCRIPT 'no_such_script.py' was not found" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture, clean_settings: None) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        cli.main(["run", "--accelerator", "cuda", "--devices", "2", ALLREDUCE])
    error = capsys.readouterr().err
    assert "--accelerator cuda was requested but this machine has no usable CUDA GPU" in error
    assert "Use --accelerator cpu" in error


def test_torchrun_arguments() -> None:
    parser = cli.build_parser()
    single = parser.parse_args(["run", "--devices", "3", "train.py", "--lr", "0.1"])
    assert cli.torchrun_arguments(single, 3) == [
        "--nnodes=1", "--nproc_per_node=3", "--max_restarts=0", "--standalone", "train.py", "--lr", "0.1"
    ]  # fmt: skip
    multi = parser.parse_args(["run", "--num-nodes", "2", "--node-rank", "1", "--main-address", "10.0.0.1", "train.py"])
    assert cli.torchrun_arguments(multi, 4) == [
        "--nnodes=2", "--nproc_per_node=4", "--max_restarts=0", "--rdzv_backend=static", "--node_rank=1",
        "--master_addr=10.0.0.1", f"--master_port={cli.MULTI_NODE_DEFAULT_PORT}", "train.py",
    ]  # fmt: skip


def test_cpu_devices_are_processes() -> None:
    assert cli.resolve_devices("cpu", "3") == (3, "3")
    assert cli.resolve_devices("cpu", "auto") == (1, "1")
    assert cli.resolve_devices("cpu", "0,1") == (2, "0,1")


def test_describe_failure() -> None:
    assert cli.describe_failure(3, 1, 1, 2).startswith("rank 3 (local rank 1 on node 1) exited with code 2")
    assert "killed by signal SIGKILL" in cli.describe_failure(0, 0, 0, -9)


# ----- the settings hand-over (cli_settings) ------------------------------------------------------
def test_no_command_line_leaves_the_arguments_alone(clean_settings: None) -> None:
    given = {**DEFAULTS, "devices": 4}
    assert apply_cli_settings(given, DEFAULTS) == given


def test_command_line_fills_in_defaults_silently(monkeypatch: pytest.MonkeyPatch, clean_settings: None) -> None:
    export_cli_settings({"accelerator": "cpu", "devices": "2", "num_nodes": 2, "precision": "bf16-mixed"}, os.environ)
    with _no_warnings():
        merged = apply_cli_settings(dict(DEFAULTS), DEFAULTS)
    assert merged == {"accelerator": "cpu", "strategy": "auto", "devices": 2, "num_nodes": 2, "precision": "bf16-mixed"}


def test_command_line_wins_and_names_both_values(monkeypatch: pytest.MonkeyPatch, clean_settings: None) -> None:
    export_cli_settings({"devices": 2, "accelerator": "cpu"}, os.environ)
    with pytest.warns(UserWarning) as record:
        merged = apply_cli_settings({**DEFAULTS, "devices": 4, "accelerator": "cuda"}, DEFAULTS)
    assert (merged["devices"], merged["accelerator"]) == (2, "cpu")
    messages = sorted(str(warning.message) for warning in record)
    assert messages[0].startswith("notebook-fabric run --accelerator cpu overrides Fabric(accelerator='cuda') in your script")
    assert messages[1].startswith("notebook-fabric run --devices 2 overrides Fabric(devices=4) in your script")


def test_equal_values_do_not_warn(monkeypatch: pytest.MonkeyPatch, clean_settings: None) -> None:
    export_cli_settings({"devices": "0,1", "precision": "bf16-mixed", "strategy": "ddp"}, os.environ)
    with _no_warnings():
        merged = apply_cli_settings({**DEFAULTS, "devices": (0, 1), "precision": "bf16", "strategy": "DDP"}, DEFAULTS)
    assert (merged["devices"], merged["precision"], merged["strategy"]) == ([0, 1], "bf16-mixed", "ddp")


def test_only_rank_zero_warns(monkeypatch: pytest.MonkeyPatch, clean_settings: None) -> None:
    export_cli_settings({"devices": 2}, os.environ)
    monkeypatch.setenv("RANK", "1")
    with _no_warnings():
        assert apply_cli_settings({**DEFAULTS, "devices": 4}, DEFAULTS)["devices"] == 2


def test_an_object_in_the_script_is_replaced_with_a_hint(monkeypatch: pytest.MonkeyPatch, clean_settings: None) -> None:
    class DDPStrategy:  # any non-string object the script passed
        pass

    export_cli_settings({"strategy": "ddp"}, os.environ)
    with pytest.warns(UserWarning, match=r"--strategy ddp overrides Fabric\(strategy=DDPStrategy\(...\)\).*leave out --strategy"):
        assert apply_cli_settings({**DEFAULTS, "strategy": DDPStrategy()}, DEFAULTS)["strategy"] == "ddp"


@pytest.mark.parametrize("text, value", [("2", 2), ("-1", -1), ("auto", "auto"), ("0,1", [0, 1]), ("1,", [1]), ("[0, 2]", [0, 2])])
def test_devices_strings_parse_back(text: str, value: object) -> None:
    assert parse_devices(text) == value


def test_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch, clean_settings: None) -> None:
    monkeypatch.setenv(env_name("num_nodes"), "zero")
    with pytest.raises(ValueError, match="NOTEBOOK_FABRIC_NUM_NODES='zero'"):
        apply_cli_settings(dict(DEFAULTS), DEFAULTS)
    monkeypatch.setenv(env_name("num_nodes"), "1")
    monkeypatch.setenv(env_name("devices"), "two")
    with pytest.raises(ValueError, match="NOTEBOOK_FABRIC_DEVICES='two'"):
        apply_cli_settings(dict(DEFAULTS), DEFAULTS)


class _no_warnings:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


# ----- real jobs ----------------------------------------------------------------------------------
def test_two_ranks_end_to_end() -> None:
    code, out, err = finish(start("--accelerator", "cpu", "--devices", "2", ALLREDUCE, module=True))
    assert code == 0, err
    rows = results(out)
    assert [row["global_rank"] for row in rows] == ["0", "1"]
    for row in rows:
        assert (row["world_size"], row["sum"], row["node_rank"]) == ("2", "3", "0")
        assert (row["env"], row["external"], row["strategy"]) == ("TorchElasticEnvironment", "True", "DDPStrategy")
    assert [row["local_rank"] for row in rows] == ["0", "1"]


def test_two_nodes_of_two_ranks_on_loopback() -> None:
    port = str(find_free_port())
    shared = ["--accelerator", "cpu", "--num-nodes", "2", "--main-address", "127.0.0.1", "--main-port", port, "--devices", "2"]
    nodes = [start(*shared, "--node-rank", str(rank), ALLREDUCE) for rank in (1, 0)]
    outcomes = [finish(process) for process in nodes]
    for code, _, err in outcomes:
        assert code == 0, err
    rows = results(outcomes[0][1] + outcomes[1][1])
    assert [row["global_rank"] for row in rows] == ["0", "1", "2", "3"]
    assert [row["node_rank"] for row in rows] == ["0", "0", "1", "1"]
    assert [row["local_rank"] for row in rows] == ["0", "1", "0", "1"]
    assert {row["world_size"] for row in rows} == {"4"}
    assert {row["sum"] for row in rows} == {"10"}  # 1 + 2 + 3 + 4 across both "machines"
    assert {row["global_rank"] for row in results(outcomes[0][1])} == {"2", "3"}  # node 1 printed ranks 2, 3


def test_a_failing_rank_ends_the_job_and_is_named(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    process = start("--accelerator", "cpu", "--devices", "2", ALLREDUCE, "--fail-rank", "1", "--pid-dir", str(tmp_path),
                    marker=marker)  # fmt: skip
    code, out, err = finish(process)
    assert code == 3, err
    assert "notebook-fabric run: rank 1 (local rank 1 on node 0) exited with code 3" in err
    assert len(list(tmp_path.glob("rank*.pid"))) == 2  # both ranks were running when rank 1 failed
    poll(lambda: not survivors(marker), 10, interval=0.2)
    left = survivors(marker)
    assert not left, f"processes outlived the failed job: {_describe_tree(left[0])}"


def test_interrupting_the_command_ends_every_rank(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    process = start("--accelerator", "cpu", "--devices", "2", ALLREDUCE, "--fail-rank", "99", "--pid-dir", str(tmp_path),
                    marker=marker)  # fmt: skip  (no rank 99: both ranks sleep after the all_reduce)
    try:
        wait_until(lambda: len(list(tmp_path.glob("rank*.pid"))) == 2 or process.poll() is not None, 90,
                   "both ranks to write their pid files")
    finally:
        process.send_signal(signal.SIGINT)
    assert len(list(tmp_path.glob("rank*.pid"))) == 2, "the command ended before both ranks started"
    code, _, err = finish(process)
    assert code == 128 + signal.SIGINT, err
    assert "notebook-fabric run: stopped by SIGINT" in err
    poll(lambda: not survivors(marker), 10, interval=0.2)
    assert not survivors(marker)


def test_spec_002_fabric_run_example() -> None:
    """spec/002: `fabric run --accelerator cuda --devices 4 train.py`, with our name and CPU ranks."""
    code, out, err = finish(start("--accelerator", "cpu", "--devices", "4", str(SCRIPTS / "cli_spec_train.py")))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("SPEC ")]
    assert len(lines) == 2 and all("world_size=4 batches=2" in line for line in lines)  # 64 samples / 4 ranks / 8
    assert "notebook-fabric run --accelerator cpu overrides Fabric(accelerator='cuda') in your script" in err
    assert "overrides Fabric(devices" not in err  # the script and the command line agree on 4
