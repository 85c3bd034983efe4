"""Shared fixtures: a clean environment for in-process tests, and ``run_script`` for real multi-rank jobs.

``run_script(path, *args, timeout=...)`` runs ``python path args`` with this interpreter in a
temporary folder, and afterwards asserts that no process it started (ranks, their children) is
still alive. Every process of the run carries a unique marker in its environment, so processes
re-parented after their parent died are found too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# One intra-op thread in the test process, set before torch loads: forked ranks then never inherit
# a started OpenMP pool (a forked child whose parent ran a parallel region can hang in its first
# matmul), and two ranks on two cores do not oversubscribe them. Scripts' ranks get the same below.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A shell's background job (``cmd &`` without job control, as CI runners and ``nohup`` start it)
# begins with SIGINT ignored, and Python then installs no handler: an interrupt would be lost. The
# interrupt tests send this process SIGINT, so give it Python's usual handler back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from support.processes import kill_and_reap  # noqa: E402
from support.script_env import INHERITED, INHERITED_PREFIXES, MARKER, script_environment  # noqa: E402,F401
from support.waiting import poll  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
#: prefix of the JSON result lines printed by tests/scripts/core_*.py (see core_common.emit)
RESULT_TAG = "NFTEST "
_MARKER = MARKER
_INHERITED_PREFIXES = INHERITED_PREFIXES
_INHERITED = INHERITED


@contextmanager
def clean_rank_environment() -> Iterator[None]:
    """No rank/scheduler/CLI variables inside; the environment and torch's default dtype are restored
    afterwards (``seed_everything`` and ``launch`` export variables)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(_INHERITED_PREFIXES) or name in _INHERITED:
                patch.delenv(name)
        saved = dict(os.environ)
        default_dtype = torch.get_default_dtype()
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)
            torch.set_default_dtype(default_dtype)


@pytest.fixture
def clean_environment() -> Iterator[None]:
    """:func:`clean_rank_environment` around one test."""
    with clean_rank_environment():
        yield


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def check(self, name: str) -> dict[int, dict[str, Any]]:
        """The records named ``name``, by rank (each rank emits a check once)."""
        found: dict[int, dict[str, Any]] = {}
        for record in self.records:
            if record.get("check") == name:
                assert record["rank"] not in found, f"rank {record['rank']} emitted {name!r} twice"
                found[record["rank"]] = record
        assert found, f"no rank emitted {name!r}\n{self.describe()}"
        return found

    def describe(self) -> str:
        return f"exit code {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def parse_records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(RESULT_TAG):]) for line in stdout.splitlines() if line.startswith(RESULT_TAG)]


def _marked_processes(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``marker``."""
    found = []
    me = os.getpid()
    for process in psutil.process_iter(["pid"]):
        if process.pid == me:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(_MARKER) == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _describe_processes(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        try:
            lines.append(f"pid {process.pid}: {' '.join(process.cmdline())} (env RANK={process.environ().get('RANK')})")
        except psutil.Error:
            lines.append(f"pid {process.pid}")
    return "\n".join(lines)


def _kill(processes: list[psutil.Process]) -> None:
    kill_and_reap(processes)


def _wait_gone(marker: str, grace: float) -> list[psutil.Process]:
    """Processes of the run still alive after ``grace`` seconds (a parent-death signal takes a moment)."""
    poll(lambda: not _marked_processes(marker), grace, interval=0.1)
    return _marked_processes(marker)


class RunningScript:
    """A script started by :func:`start_script`; :meth:`wait` collects it and checks that nothing survives it."""

    def __init__(self, path: Any, *args: Any, cwd: Path, timeout: float = 120,
                 env: Optional[dict[str, str]] = None) -> None:  # fmt: skip
        self.marker = uuid.uuid4().hex
        self.cwd = Path(cwd)
        self.timeout = timeout
        self.command = [sys.executable, str(path), *map(str, args)]
        self._deadline = time.monotonic() + timeout
        # files, not pipes: several scripts may run at once and none may block on a full pipe
        self._stdout = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.process = subprocess.Popen(
            self.command, cwd=str(self.cwd), env={**script_environment(self.marker), **(env or {})},
            stdout=self._stdout, stderr=self._stderr,
        )  # fmt: skip

    def _output(self) -> tuple[str, str]:
        texts = []
        for handle in (self._stdout, self._stderr):
            handle.seek(0)
            texts.append(handle.read())
            handle.close()
        return texts[0], texts[1]

    def wait(self) -> ScriptResult:
        name = " ".join(self.command)
        try:
            self.process.wait(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill([self.process, *_marked_processes(self.marker)])
            stdout, stderr = self._output()
            pytest.fail(f"{name} did not finish within {self.timeout}s\n{stdout}\n{stderr}")
        stdout, stderr = self._output()
        survivors = _wait_gone(self.marker, grace=5.0)
        if survivors:
            description = _describe_processes(survivors)
            _kill(survivors)
            pytest.fail(f"processes of {name} survived it:\n{description}\n{stderr}")
        return ScriptResult(self.process.returncode, stdout, stderr, self.cwd, parse_records(stdout))


def start_script(path: Any, *args: Any, cwd: Path, timeout: float = 120, env: Optional[dict[str, str]] = None) -> RunningScript:
    """Start ``python path args`` in ``cwd`` (several may run at once); collect it with ``.wait()``."""
    return RunningScript(path, *args, cwd=cwd, timeout=timeout, env=env)


def execute_script(path: Any, *args: Any, cwd: Path, timeout: float = 120, env: Optional[dict[str, str]] = None) -> ScriptResult:
    """Run ``python path args`` in ``cwd`` to the end; fail if it outlives ``timeout`` or leaves a process behind."""
    return start_script(path, *args, cwd=cwd, timeout=timeout, env=env).wait()


@pytest.fixture
def run_script(tmp_path: Path) -> Callable[..., ScriptResult]:
    """``run_script(path, *args, timeout=120, cwd=None, env=None)`` -> :class:`ScriptResult`, run in ``tmp_path``.

    Fails the test if the script outlives ``timeout`` (its processes are killed first) or if any
    process of the run survives it.
    """

    def run(path: Any, *args: Any, timeout: float = 120, cwd: Optional[Path] = None,
            env: Optional[dict[str, str]] = None) -> ScriptResult:  # fmt: skip
        return execute_script(path, *args, cwd=cwd if cwd is not None else tmp_path, timeout=timeout, env=env)

    return run


@pytest.fixture(autouse=True)
def _interrupts_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves SIGINT ignored, replaced or blocked in this process would swallow a later
    test's interrupt: put the handler and the main thread's signal mask back as they were, and warn
    naming the test."""
    handler = signal.getsignal(signal.SIGINT)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    now_handler, now_mask = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if now_handler is handler and now_mask == mask:
        return
    signal.signal(signal.SIGINT, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    warnings.warn(f"{request.node.nodeid} left SIGINT's handler {now_handler!r} (was {handler!r}) and the main "
                  f"thread's blocked signals {sorted(now_mask)} (were {sorted(mask)}); restored", stacklevel=1)
