"""A real Jupyter kernel to drive the magics with (jupyter_client); no tests here.

``Kernel.run(code)`` sends an execute request and collects everything the kernel publishes for
it until it is idle again: stdout, stderr, the ``execute_result`` text and the error, if any.
``Kernel.run_in_subshell(code)`` runs code on a kernel subshell (ipykernel >= 7), which answers
while the main shell is busy with a cell.
"""
from __future__ import annotations

import os
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import psutil
from jupyter_client.manager import KernelManager

PYTHON = sys.executable


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

    @property
    def error_text(self) -> str:
        return "\n".join(self.traceback)

    @property
    def all_text(self) -> str:
        return "\n".join([self.stdout, self.stderr, self.result, self.error_text])


class Kernel:
    """An ipykernel running this venv's Python, with a blocking client."""

    def __init__(self) -> None:
        self.km = KernelManager(kernel_name="python3")
        # run the kernel with this interpreter, whatever the installed kernelspec says
        self.km.kernel_spec.argv = [PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        # these tests read the text output; the dashboard has tests of its own (test_dashboard_*.py)
        self.km.start_kernel(env={**os.environ, "PYTHONUNBUFFERED": "1", "NOTEBOOK_FABRIC_DASHBOARD": "0"})
        self.client = self.km.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
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

    def send(self, code: str, subshell: Optional[str] = None) -> str:
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": False}
        msg = self.client.session.msg("execute_request", content)
        if subshell is not None:
            msg["header"]["subshell_id"] = subshell
        self.client.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    def collect(self, msg_id: str, timeout: float = 120.0) -> Reply:
        """Gather iopub output of ``msg_id`` until the kernel reports idle for it, then its reply."""
        reply = Reply()
        deadline = time.monotonic() + timeout
        held = self._held.pop(msg_id, [])
        while True:
            if held:
                msg = held.pop(0)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no idle status for {msg_id} within {timeout} s; so far: {reply}")
                try:
                    msg = self.client.get_iopub_msg(timeout=remaining)
                except queue.Empty:
                    continue
            parent = msg["parent_header"].get("msg_id")
            if parent != msg_id:
                if parent:
                    self._held.setdefault(parent, []).append(msg)
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    reply.stdout += content["text"]
                else:
                    reply.stderr += content["text"]
            elif kind == "execute_result":
                reply.result += content["data"].get("text/plain", "")
            elif kind == "error":
                reply.ename, reply.evalue, reply.traceback = content["ename"], content["evalue"], content["traceback"]
            elif kind == "status" and content["execution_state"] == "idle":
                break
        reply.status = "error" if reply.ename else "ok"
        return reply

    def wait_for_output(self, msg_id: str, snippet: str, timeout: float = 60.0) -> None:
        """Block until ``msg_id`` (still running) has published stream text containing ``snippet``.

        The messages read meanwhile are kept for :meth:`collect`.
        """
        deadline = time.monotonic() + timeout
        seen = ""
        while snippet not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{snippet!r} not published within {timeout} s; saw {seen!r}")
            try:
                msg = self.client.get_iopub_msg(timeout=remaining)
            except queue.Empty:
                continue
            parent = msg["parent_header"].get("msg_id")
            if parent:
                self._held.setdefault(parent, []).append(msg)
            if parent == msg_id and msg["msg_type"] == "stream":
                seen += msg["content"]["text"]

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

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self) -> None:
        try:
            self.client.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=False)


def wait_gone(pids: List[int], timeout: float = 15.0) -> List[int]:
    """The pids still alive (not zombies) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def rank_pids(kernel: Kernel) -> List[int]:
    """Pids of the kernel's rank processes (children whose name marks them as ranks, or any child)."""
    return [p.pid for p in kernel.children()]


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def parse_status_pids(text: str) -> Dict[int, int]:
    """``{rank: pid}`` from ``%fabric status`` output."""
    pids = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            pids[int(parts[0])] = int(parts[1])
    return pids
