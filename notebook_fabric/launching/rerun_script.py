"""``strategy="ddp"`` in a script: ``fabric.launch()`` re-runs the script for ranks 1..N-1.

This process becomes local rank 0. The rendezvous store is hosted here on a port the OS picks
(no free-port race), every rank joins it as a client, and a watcher ends the whole job as soon as
any rank fails, naming it. Children die with this process (parent-death signal + atexit).
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from ..live.notices import write_notice
from .processes import die_with_parent, libc_handle

#: how long rank 0, exiting normally, waits for the other ranks to finish before terminating them
FINISH_GRACE_SECONDS = 30.0
#: how long a terminated rank gets before it is killed
TERMINATE_GRACE_SECONDS = 3.0
_state: dict[str, Any] = {}


def script_command() -> list[str]:
    """The command line that started this interpreter, to start it again (``-m``, ``-u``, ``-X`` kept)."""
    original = getattr(sys, "orig_argv", None)
    if original:
        return [sys.executable, *original[1:]]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        module = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [sys.executable, "-m", module, *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def _host_store() -> int:
    """A loopback-only TCPStore server in this process on an OS-chosen port; returns the port."""
    from .rendezvous import RendezvousStore

    store = RendezvousStore()
    _state["store"] = store  # keep it alive as long as the job
    return store.port


def start_script_ranks(num_processes: int, num_nodes: int, node_rank: int, environment: Any) -> None:
    """Start local ranks 1..``num_processes``-1 of node ``node_rank`` by re-running this script."""
    if _state.get("children"):
        raise RuntimeError("The script ranks were already started in this process")
    address = environment.main_address
    if node_rank == 0 and num_nodes == 1 and "MASTER_PORT" not in os.environ:
        from .rendezvous import LOOPBACK

        from ..strategies import rendezvous_rounds

        address, port = LOOPBACK, _host_store()
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
        os.environ[rendezvous_rounds.HOSTED_STORE_VARIABLE] = "1"  # each group its own keys (and the children's)
        rendezvous_rounds.install()
    else:
        port = environment.main_port
    world_size = num_nodes * num_processes
    shared = {
        "MASTER_ADDR": address,
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world_size),
        "NODE_RANK": str(node_rank),
        "LOCAL_WORLD_SIZE": str(num_processes),
    }
    os.environ.update(shared)
    command = script_command()
    libc_handle()  # looked up here, so that the children's die_with_parent (between fork and exec) finds it
    children: list[subprocess.Popen] = []
    for local_rank in range(1, num_processes):
        env = {
            **os.environ,
            "LOCAL_RANK": str(local_rank),
            "RANK": str(node_rank * num_processes + local_rank),
            "PYTHONUNBUFFERED": "1",  # a rank stopped because another failed must not lose what it printed
        }
        children.append(subprocess.Popen(command, env=env, preexec_fn=die_with_parent))
    os.environ["LOCAL_RANK"] = "0"
    os.environ["RANK"] = str(node_rank * num_processes)
    environment.set_global_rank(node_rank * num_processes)
    _state["children"] = children
    atexit.register(_stop_children)
    sys.excepthook = _note_failure(sys.excepthook)
    threading.Thread(target=_watch_children, args=(children, node_rank * num_processes), daemon=True).start()


def _watch_children(children: list[subprocess.Popen], first_rank: int, interval: float = 0.1) -> None:
    """End the job when a rank fails: a rank stuck in a collective would otherwise wait for its timeout."""
    pending = dict(enumerate(children, start=1))
    while pending and not _state.get("stopping"):
        for local_rank, child in list(pending.items()):
            code = child.poll()
            if code is None:
                continue
            del pending[local_rank]
            if code != 0 and not _state.get("stopping"):
                reason = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                write_notice([f"rank {first_rank + local_rank} {reason}; stopping the other ranks."], level="error")
                _stop_children(grace=0.0)
                os._exit(1)
        time.sleep(interval)


def _note_failure(hook: Any) -> Any:
    def excepthook(*exc_info: Any) -> None:
        _state["failed"] = True
        hook(*exc_info)

    return excepthook


def _stop_children(grace: Optional[float] = None) -> None:
    """Let the other ranks finish (they are usually right behind this one), then terminate, then kill."""
    children: Optional[list[subprocess.Popen]] = _state.get("children")
    if not children:
        return
    _state["stopping"] = True
    if grace is None:
        grace = 0.0 if _state.get("failed") else FINISH_GRACE_SECONDS
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
