"""How XLA ranks run on each kind of device: the one place that knows XLA:CPU is not a TPU.

On a TPU torch_xla's launcher starts one process per chip, collectives join the lazy graph and run
at the next sync, and :class:`ProcessRanks` adds nothing to that.

On torch_xla's CPU device (``PJRT_DEVICE=CPU``, used where there is no TPU, e.g. in CI) the same
launcher runs the ranks as threads of ONE process, one per virtual device (``CPU_NUM_DEVICES=N``).
XLA's in-process collectives then need what :class:`ThreadRanks` does, and only there:

1. Every thread dispatches the same compiled graph, in the same order. Two threads compiling one
   graph at the same time get two executables whose collectives wait for each other's peers (XLA
   aborts the process after 10 s). So graphs are synced in turns, ordinal 0 first: it compiles,
   the others find the graph in the compile cache (:meth:`ThreadRanks.sync`). Values must not change
   the graph either: XLA lowers a Python number in the computation (``x * rank``) and a 0-dim tensor
   holding 0 or 1 as constants, so such graphs differ by rank (``XLA_NO_SPECIAL_SCALARS`` does not
   change that here). A 0-dim collective input is therefore passed as a reshaped 1-element tensor
   (:meth:`ThreadRanks.collective_input`); a value that differs by rank must reach the graph as
   tensor data (``torch.tensor([rank]).to(device)``), which is what the launcher's error says when
   XLA aborts on differing graphs.
2. A graph holding a collective must never run by an implicit sync (``.item()``, ``print``), which
   each thread would compile on its own; so on CPU every collective, backward and optimizer step is
   followed by a sync in turns (:meth:`ThreadRanks.settle`), and values read afterwards are ready.
3. The execution pool has at least N threads (``XLA_THREAD_POOL_SIZE``): each participant of a
   collective blocks one of them until all have arrived.
4. Collectives are not layout-pinned (``pin_layout=False``; FSDP's
   ``pin_layout_in_collective_ops=False``): pinned layouts deadlock XLA's CPU collectives.
5. The threads share one CPU random generator: build random models and data under
   :attr:`ThreadRanks.lock` (rank 0's parameters are broadcast at setup anyway).
7. torch_xla keeps each device's collective token in one table for the process: a sync resetting
   one thread's token while another thread issues a collective crashed the process (a segfault in
   ``reduce_gradients``). Issuing a collective and syncing hold one lock (:meth:`ThreadRanks.issue`),
   taken only after a thread's turn came, so nobody waits for a turn while holding it.
8. Once every rank dispatched a graph, each waits for its own device to finish it before recording
   more (:meth:`ThreadRanks.sync`): a CPU test needs no overlap. Only its own device: a peer may
   already have dispatched its next graph, whose collective waits for this rank.
9. ``xm.all_reduce`` on a list of tensors (the in-place form that ``xm.reduce_gradients`` and
   ``xm.collective_broadcast`` use) crashed the process (a segfault in ``_xla_all_reduce_inplace``)
   in most data-parallel steps; one functional all-reduce per tensor ran 4 of 4 and every test
   since. So the gradients and broadcasts go one tensor at a time here.
10. ``torch_xla.sync()`` ends by dropping the device's collective token. When that token held the
   last reference to a buffer the just-dispatched graph reads, dropping it waits (holding the GIL)
   until that graph has run, and a graph with a collective runs only once every peer dispatched it:
   but the peers wait for this rank's turn to end. That deadlock was the intermittent abort of
   bf16-true, ``xla_fsdp`` and the data-parallel step (one device in an all-gather its peer never
   joined; py-spy showed rank 0 in ``_set_all_reduce_token`` -> ``PjRtBuffer::Delete`` and rank 1
   waiting for its turn). So :meth:`ThreadRanks.sync` keeps its own reference to the token until
   this rank's graph has run, and releases it only then.
11. Rank 0's initial parameters reach the other threads through memory (the board of point 6), and
   each takes a fresh device copy (``tensor.data = ...``): broadcasting them with an XLA collective
   written in place (``copy_``) before ``xla_fsdp`` sharded them left the two devices training
   different full parameters from the second step on (torch_xla's FSDP alone, without that
   broadcast, matched the full-batch eager losses).
6. Debug mode's checks travel through a board in memory (:class:`ThreadBoard`), each thread has its
   own tracer chain, and a rank that ends leaves the board, so a peer's check says so at once.

Measured 2026-12-03 (torch 2.9.0 / torch_xla 2.9.0, 2 cores): on two devices the collectives, a
data-parallel step, bf16-true, bf16-mixed and ``xla_fsdp`` (full and sharded checkpoints) give the
full-batch eager values (3 of 3 full runs and 3 more of the FSDP tests). The aborts the previous
round left open were deadlocks, found with py-spy and fixed: reading back a value whose graph holds a
collective (point 2, ``collective_input``) and the dropped collective token (point 10); FSDP's wrong
losses came from the in-place broadcast before sharding (point 11). Fixed before that: the in-place
list all-reduce (point 9), a forked ranks' process inheriting this process's autograd engine (the
launcher spawns), waiting for every device after a sync (point 8). Making one rank thread run at a
time made every run abort: XLA's CPU client may run a graph inline in the dispatching thread, so a
rank must never hold anything a peer needs while it syncs.
"""
from __future__ import annotations

import os
import pickle
import threading
from typing import Any, Callable, Dict, List, Optional

from ..collectives.check_mesh import MeshPeerGone

#: execution threads XLA:CPU gets at least (each rank's collective holds one until all arrive)
MIN_THREAD_POOL_SIZE = 8


def xla_device_type() -> str:
    """The device kind torch_xla runs on here: ``"TPU"``, ``"CPU"``, ... (torch_xla picks CPU without a TPU)."""
    chosen = os.environ.get("PJRT_DEVICE")
    if chosen:
        return chosen.upper()
    import torch_xla.runtime as xr

    return str(xr.device_type() or "CPU").upper()


def ranks_for(device_type: Optional[str] = None) -> "ProcessRanks":
    """How the ranks on ``device_type`` (default: this runtime's) run."""
    return _THREADS if (device_type or xla_device_type()) == "CPU" else _PROCESSES


class ProcessRanks:
    """One process per device (TPU): collectives stay in the lazy graph; nothing extra."""

    threads = False
    pin_layout = True
    broadcast_initial_states = False  # each process seeds its own generator: same seed, same model

    def launch_environment(self, devices: int) -> Dict[str, str]:
        """Variables the launcher sets before torch_xla starts the ranks."""
        return {}

    def enter_rank(self, rank: int, world_size: int) -> None:
        """Called first in every rank."""

    def leave_rank(self, rank: int) -> None:
        """Called last in every rank (after its function returned): wait until every rank is done,
        so nobody exits while a peer may still need it."""
        import torch_xla.core.xla_model as xm

        xm.rendezvous("notebook_fabric.end")

    def sync(self) -> None:
        """Cut the lazy graph here and run it."""
        import torch_xla

        torch_xla.sync()

    def settle(self) -> None:
        """After a collective, backward or optimizer step: nothing (the graph runs at the next sync)."""

    def issue(self, collective: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Put a torch_xla collective into this rank's graph."""
        return collective(*args, **kwargs)

    def reduce_gradients(self, optimizer: Any, world_size: int) -> None:
        """Average the gradients of ``optimizer``'s parameters over the ranks (torch_xla's own way)."""
        import torch_xla.core.xla_model as xm

        self.issue(xm.reduce_gradients, optimizer, pin_layout=self.pin_layout)

    def broadcast_(self, tensors: List[Any], src: int) -> None:
        """Rank ``src``'s values into ``tensors`` on every rank, in place."""
        import torch_xla.core.xla_model as xm

        self.issue(xm.collective_broadcast, tensors, root_ordinal=src, pin_layout=self.pin_layout)

    def share_initial_states(self, tensors: List[Any], src: int) -> None:
        """Rank ``src``'s parameter and buffer values in ``tensors`` on every rank (at set-up)."""
        self.broadcast_(tensors, src)
        self.sync()

    def collective_input(self, tensor: Any, device: Any) -> Any:
        """``tensor`` on the rank's XLA device, as a collective takes it."""
        return tensor if tensor.device.type == "xla" else tensor.to(device)

    def check_channel(self, rank: int, world_size: int) -> Any:
        """Debug mode's channel to the peers: torch_xla's own rendezvous, which carries bytes."""
        return _RendezvousChannel()


class ThreadRanks(ProcessRanks):
    """Ranks as threads of one process on XLA:CPU (see the module docstring for each point)."""

    threads = True
    pin_layout = False
    broadcast_initial_states = True  # point 5

    def __init__(self) -> None:
        self.lock = threading.RLock()  # point 5; also guards this object's own state
        self._xla_lock = threading.Lock()  # point 7: held to issue a collective or sync, never to wait
        self._turns: Optional[_Turns] = None
        self._board: Optional[ThreadBoard] = None

    def launch_environment(self, devices: int) -> Dict[str, str]:
        pool = max(int(os.environ.get("XLA_THREAD_POOL_SIZE", "0") or 0), devices, MIN_THREAD_POOL_SIZE)
        return {"CPU_NUM_DEVICES": str(devices), "XLA_THREAD_POOL_SIZE": str(pool)}

    def enter_rank(self, rank: int, world_size: int) -> None:
        from ..collectives.trace import tracers_per_thread

        tracers_per_thread()
        with self.lock:
            if self._turns is None or self._turns.world_size != world_size:
                self._turns = _Turns(world_size)
                self._board = ThreadBoard(world_size)

    def leave_rank(self, rank: int) -> None:
        # threads need no end barrier (the process outlives them all); a peer still waiting for
        # this rank's turn or check learns at once that it ended
        if self._turns is not None:
            self._turns.leave(rank)
        if self._board is not None:
            self._board.leave(rank)

    def sync(self) -> None:
        import torch_xla
        import torch_xla.runtime as xr

        turns = self._turns
        if turns is None or turns.world_size == 1:
            with self._xla_lock:
                torch_xla.sync()
            return
        rank = int(xr.global_ordinal())
        device = str(torch_xla.device())
        turns.wait_for(rank)
        try:
            with self._xla_lock:
                # point 10: the token sync() drops stays alive here until this rank's graph has run
                dropped_token = torch_xla._XLAC._get_all_reduce_token(device)
                torch_xla.sync()  # compiles (ordinal 0) or hits the cache (the others), then dispatches
        finally:
            turns.done(rank)
        # point 8: once every rank dispatched this graph, let it run to the end on this rank's device
        # (this device only: a peer may already have dispatched its next graph, which waits for us)
        turns.wait_for_round(rank)
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops(xm.xla_real_devices([device]))
        del dropped_token  # its buffers are idle now: releasing them no longer waits

    def settle(self) -> None:
        self.sync()

    def issue(self, collective: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._xla_lock:  # point 7
            return collective(*args, **kwargs)

    def reduce_gradients(self, optimizer: Any, world_size: int) -> None:
        # point 9: one functional all-reduce per gradient, never the in-place list form
        import torch
        import torch_xla.core.xla_model as xm

        with self._xla_lock, torch.no_grad():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        grad = parameter.grad
                        grad.copy_(xm.all_reduce("sum", grad, scale=1.0 / world_size, pin_layout=False))

    def broadcast_(self, tensors: List[Any], src: int) -> None:
        # point 9: rank src keeps its values, the others contribute zeros, to one functional all-reduce
        # each (the factor travels as data: a constant 0 or 1 would make the ranks' graphs differ)
        import torch
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        keep = 1 if int(xr.global_ordinal()) == src else 0
        with self._xla_lock, torch.no_grad():
            for tensor in tensors:
                factor = torch.tensor([keep], dtype=tensor.dtype).to(tensor.device).reshape(())
                tensor.copy_(xm.all_reduce("sum", tensor * factor, pin_layout=False))

    def share_initial_states(self, tensors: List[Any], src: int) -> None:
        # point 11: the threads share memory, so rank src's values travel over the board and the others
        # take fresh device copies; no XLA collective, and no in-place write into the parameters
        import torch
        import torch_xla.runtime as xr

        if self._board is None:
            raise RuntimeError("ThreadRanks.enter_rank() was not called in this rank")
        rank = int(xr.global_ordinal())
        self.sync()  # whatever the values still depend on runs first (in turns)
        values = [tensor.detach().cpu() for tensor in tensors] if rank == src else None
        handed = self._board.exchange(rank, values)[src]
        if rank != src:
            with torch.no_grad():
                for tensor, value in zip(tensors, handed):
                    tensor.data = value.to(tensor.device)

    def collective_input(self, tensor: Any, device: Any) -> Any:
        if tensor.dim() == 0 and not tensor.requires_grad:
            # point 1: XLA lowers a 0-dim tensor holding 0 or 1 as a constant, so ranks holding 0 and 1
            # compile different graphs; a reshaped 1-element tensor stays a parameter
            if tensor.device.type == "xla":
                # point 2: reading it back is an implicit sync, and its graph may hold collectives
                # (FSDP's forward gathers): run that graph in turns first, then only data moves
                self.sync()
            tensor = tensor.cpu().reshape(1).to(device).reshape(())
        return super().collective_input(tensor, device)

    def check_channel(self, rank: int, world_size: int) -> Any:
        if self._board is None:
            raise RuntimeError("ThreadRanks.enter_rank() was not called in this rank")
        return _BoardSeat(self._board, rank)


class _Turns:
    """Round-robin turns for the graph syncs of N rank threads: rank r syncs after rank r-1."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._turn = 0
        self._syncs = [0] * world_size
        self._left: set = set()
        self._changed = threading.Condition()

    def wait_for(self, rank: int) -> None:
        with self._changed:
            while self._turn != rank:
                if self._turn in self._left:
                    raise RuntimeError(
                        f"rank {rank} reached a graph sync that rank {self._turn} never made: rank {self._turn} has"
                        " ended. On XLA every rank must make the same collectives, backward passes, optimizer steps"
                        " and mark_step() calls, in the same order."
                    )
                self._changed.wait(0.5)

    def done(self, rank: int) -> None:
        with self._changed:
            self._turn = (rank + 1) % self.world_size
            self._syncs[rank] += 1
            self._changed.notify_all()

    def wait_for_round(self, rank: int) -> None:
        """Until every rank made as many syncs as ``rank`` (ranks that ended are not waited for)."""
        with self._changed:
            mine = self._syncs[rank]
            while any(count < mine for other, count in enumerate(self._syncs) if other not in self._left):
                self._changed.wait(0.5)

    def leave(self, rank: int) -> None:
        with self._changed:
            self._left.add(rank)
            self._changed.notify_all()


class ThreadBoard:
    """An all-gather in memory between N rank threads: each :meth:`exchange` returns every rank's item.

    A rank that :meth:`leave` s makes every exchange still waiting for it, and every later one,
    raise :class:`MeshPeerGone` naming it.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._changed = threading.Condition()
        self._round = 0
        self._items: Dict[int, Any] = {}
        self._results: Dict[int, List[Any]] = {}
        self._left: set = set()

    def exchange(self, rank: int, item: Any) -> List[Any]:
        with self._changed:
            while rank in self._items:  # this rank is a round ahead: wait for the current one to close
                self._changed.wait()
            round_ = self._round
            self._items[rank] = item
            if len(self._items) == self.world_size:
                self._results[round_] = [self._items[r] for r in range(self.world_size)]
                self._items = {}
                self._round += 1
                self._changed.notify_all()
            while round_ not in self._results:
                gone = sorted(self._left - set(self._items))
                if gone:
                    raise MeshPeerGone(f"rank {gone[0]} ended before reaching the collective")
                self._changed.wait()
            result = self._results[round_]
            self._collect(round_)
            return result

    def _collect(self, round_: int) -> None:
        """Forget rounds every rank has read (the round before the current one is read by all)."""
        for old in [r for r in self._results if r < round_ - 1]:
            del self._results[old]

    def leave(self, rank: int) -> None:
        with self._changed:
            self._left.add(rank)
            self._changed.notify_all()


class _BoardSeat:
    """One rank's side of a :class:`ThreadBoard`, with :class:`~..collectives.check_mesh.CheckMesh`'s methods."""

    def __init__(self, board: ThreadBoard, rank: int) -> None:
        self.board = board
        self.rank = rank

    def exchange(self, frame: bytes) -> List[bytes]:
        return self.board.exchange(self.rank, frame)

    def exchange_objects(self, obj: Any) -> List[Any]:
        return self.board.exchange(self.rank, obj)


class _RendezvousChannel:
    """Debug mode's channel between rank processes (TPU): torch_xla's rendezvous carries the bytes."""

    def exchange(self, frame: bytes) -> List[bytes]:
        import torch_xla.core.xla_model as xm

        return list(xm.rendezvous("notebook_fabric.check", frame))

    def exchange_objects(self, obj: Any) -> List[Any]:
        return [pickle.loads(item) for item in self.exchange(pickle.dumps(obj))]


_PROCESSES = ProcessRanks()
_THREADS = ThreadRanks()
