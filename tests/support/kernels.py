"""A real Jupyter kernel to drive launch() and the magics with (jupyter_client); no tests here.

``Kernel.run(code)`` sends an execute request and collects everything the kernel publishes for
it until it is idle again: stdout, stderr, the ``execute_result`` text, displays, the error, if
any. ``Kernel.send`` / ``Kernel.collect`` split that in two, so a test can act while a cell runs
(``wait_for_output``, ``run_in_subshell`` on a kernel subshell (ipykernel >= 7), which answers
while the main shell is busy, ``interrupt``, ``prompt`` / ``answer`` for the kernel's input
requests). ``Kernel.ranks()`` are the kernel's living descendants, multiprocessing's helpers left
out. :func:`magics_kernel` is a kernel with the extension loaded, for module fixtures.
"""
from __future__ import annotations

import os
import queue
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, IO, Iterator, List, Optional

import psutil
from jupyter_client.manager import KernelManager

from support.processes import living_descendants

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


@dataclass
class Reply:
    """What one execution published."""

    status: str = ""
    stdout: str = ""
    stderr: str = ""
    result: str = ""
    ename: str = ""
    evalue: str = ""
    traceback: List[str] = field(default_factory=list)
    displays: Dict[Optional[str], Dict[str, Any]] = field(default_factory=dict)  # by display id; updates replace
    types: List[str] = field(default_factory=list)  # the iopub message types, in order
    shown: List[str] = field(default_factory=list)  # every text shown, in order (streams, results, displays, errors)

    @property
    def error_text(self) -> str:
        return "\n".join(self.traceback)

    @property
    def all_text(self) -> str:
        return "\n".join([self.stdout, self.stderr, self.result, self.error_text])

    @property
    def text(self) -> str:
        """Everything shown, in order (a display as its plain text and its HTML)."""
        return "".join(self.shown)

    def add(self, msg: Dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        self.types.append(kind)
        if kind == "stream":
            if content["name"] == "stdout":
                self.stdout += content["text"]
            else:
                self.stderr += content["text"]
            self.shown.append(content["text"])
        elif kind == "execute_result":
            self.result += content["data"].get("text/plain", "")
            self.shown.append(content["data"].get("text/plain", "") + "\n" + content["data"].get("text/html", ""))
        elif kind in ("display_data", "update_display_data"):
            self.displays[content.get("transient", {}).get("display_id")] = content["data"]
            self.shown.append(content["data"].get("text/plain", "") + "\n" + content["data"].get("text/html", ""))
        elif kind == "error":
            self.ename, self.evalue, self.traceback = content["ename"], content["evalue"], content["traceback"]
            self.shown.append("\n".join(content["traceback"]))


def plain(text: str) -> str:
    """``text`` without ANSI colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def kernel_environment(dashboard: bool = False) -> Dict[str, str]:
    """This environment, the repository and the tests' support importable, unbuffered, one thread."""
    path = os.pathsep.join(filter(None, [str(REPO), str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
            "NOTEBOOK_FABRIC_DASHBOARD": "1" if dashboard else "0"}  # fmt: skip


class Kernel:
    """An ipykernel running this venv's Python, with a blocking client.

    ``dashboard``: the live dashboard on (tests of the text output turn it off); ``env``: the
    kernel's whole environment instead of :func:`kernel_environment`; ``cwd``: its folder; ``log``:
    a file for the kernel's own stdout and stderr; ``allow_stdin``: cells may ask for input, as in
    a notebook (answer with :meth:`prompt` and :meth:`answer`).
    """

    def __init__(self, dashboard: bool = False, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
                 log: Optional[IO[str]] = None, allow_stdin: bool = False) -> None:  # fmt: skip
        self.km = KernelManager(kernel_name="python3")
        # run the kernel with this interpreter, whatever the installed kernelspec says
        self.km.kernel_spec.argv = [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        options: Dict[str, Any] = {"env": env if env is not None else kernel_environment(dashboard)}
        if cwd is not None:
            options["cwd"] = str(cwd)
        if log is not None:
            options.update(stdout=log, stderr=log)
        self.km.start_kernel(**options)
        self.allow_stdin = allow_stdin
        self.client = self.km.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)
        self._subshell: Optional[str] = None
        self._held: Dict[str, List[Dict[str, Any]]] = {}  # iopub messages of other requests, read early

    @property
    def pid(self) -> int:
        return self.km.provisioner.pid  # type: ignore[union-attr]

    def children(self) -> List[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def ranks(self) -> List[psutil.Process]:
        """The kernel's living descendants (ranks, their children), multiprocessing's helpers left out."""
        return living_descendants(self.pid)

    def send(self, code: str, subshell: Optional[str] = None, allow_stdin: Optional[bool] = None) -> str:
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": self.allow_stdin if allow_stdin is None else allow_stdin, "stop_on_error": False}
        msg = self.client.session.msg("execute_request", content)
        if subshell is not None:
            msg["header"]["subshell_id"] = subshell
        self.client.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    def _next(self, timeout: float) -> Optional[Dict[str, Any]]:
        """The next iopub message, kept for its request if it has one (``None``: none within ``timeout``)."""
        try:
            msg = self.client.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        parent = msg["parent_header"].get("msg_id")
        if parent:
            self._held.setdefault(parent, []).append(msg)
        return msg

    def collect(self, msg_id: str, timeout: float = 120.0) -> Reply:
        """Gather iopub output of ``msg_id`` until the kernel reports idle for it."""
        reply = Reply()
        deadline = time.monotonic() + timeout
        while True:
            held = self._held.get(msg_id)
            if held:
                msg = held.pop(0)
                reply.add(msg)
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no idle status for {msg_id} within {timeout} s; so far: {reply}")
            self._next(remaining)
        self._held.pop(msg_id, None)
        reply.status = "error" if reply.ename else "ok"
        return reply

    def output_so_far(self, msg_id: str) -> str:
        """The stream text ``msg_id`` has published so far (read now or earlier, kept for :meth:`collect`)."""
        while self._next(0) is not None:
            pass
        return "".join(m["content"]["text"] for m in self._held.get(msg_id, []) if m["msg_type"] == "stream")

    def wait_for_output(self, msg_id: str, snippet: str, timeout: float = 60.0) -> None:
        """Block until the stream output of ``msg_id`` (still running) contains ``snippet``."""
        deadline = time.monotonic() + timeout
        while snippet not in self.output_so_far(msg_id):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{snippet!r} not published within {timeout} s; saw {self.output_so_far(msg_id)!r}")
            self._next(min(0.2, remaining))

    def run(self, code: str, timeout: float = 120.0) -> Reply:
        return self.collect(self.send(code), timeout)

    def ok(self, code: str, timeout: float = 120.0) -> Reply:
        """``run`` and assert that it did not fail."""
        reply = self.run(code, timeout)
        assert reply.status == "ok", f"cell failed:\n{code}\n---\n{reply.all_text}"
        return reply

    def subshell(self) -> str:
        """A kernel subshell (created once): executes while the main shell is busy."""
        if self._subshell is None:
            msg = self.client.session.msg("create_subshell_request", {})
            self.client.control_channel.send(msg)
            answer = self.client.control_channel.get_msg(timeout=10)
            self._subshell = answer["content"]["subshell_id"]
        return self._subshell

    def run_in_subshell(self, code: str, timeout: float = 30.0) -> Reply:
        return self.collect(self.send(code, subshell=self.subshell()), timeout)

    def status(self) -> str:
        """``%fabric status``, asked on a subshell (it answers while a cell runs)."""
        return self.run_in_subshell("%fabric status").stdout

    def prompt(self, timeout: float = 60.0) -> str:
        """The prompt of the kernel's next ``input_request``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.client.get_stdin_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no input request within {timeout} s") from None
            if msg["msg_type"] == "input_request":
                return msg["content"]["prompt"]

    def answer(self, line: str) -> None:
        self.client.input(line)

    def answer_each(self, lines: "tuple[str, ...]") -> "list[str]":
        """Answer the next ``len(lines)`` input requests with ``lines`` in order; the prompts they showed."""
        prompts = []
        for line in lines:
            prompts.append(self.prompt())
            self.answer(line)
        return prompts

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self, now: bool = False) -> None:
        try:
            self.client.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=now)


@contextmanager
def magics_kernel(**options: Any) -> Iterator[Kernel]:
    """A :class:`Kernel` with ``%load_ext notebook_fabric`` done, shut down afterwards."""
    kernel = Kernel(**options)
    try:
        kernel.ok("%load_ext notebook_fabric")
        yield kernel
    finally:
        kernel.shutdown()


def rank_pids(kernel: Kernel) -> List[int]:
    """Pids of the kernel's rank processes (children whose name marks them as ranks, or any child)."""
    return [p.pid for p in kernel.children()]


def parse_status_pids(text: str) -> Dict[int, int]:
    """``{rank: pid}`` from ``%fabric status`` output."""
    pids = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            pids[int(parts[0])] = int(parts[1])
    return pids
