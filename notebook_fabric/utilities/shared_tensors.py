"""Launch arguments whose tensors reach the ranks in shared memory (what ``ddp_spawn`` promises).

Under ``spawn`` and ``forkserver`` the launch payload is pickled. A value boxed in
:class:`SharedTensors` and pickled with :func:`dumps` ships each plain CPU tensor as a reference to
its storage, moved into shared memory first (in place, as ``Tensor.share_memory_()`` does: the
caller's tensor is shared from then on). A rank's in-place write to such a tensor is therefore
seen by the other ranks and, after the launch, by the caller. Parameters and buffers of every
``nn.Module`` in the value are copied as before: each rank updates its own model (shared weights
would race at every optimizer step). Tied weights stay tied: one ``Parameter`` object, pickled once.

How the memory reaches a rank: torch's file-descriptor sharing unlinks the shared memory's name
as soon as it exists (nothing is left in ``/dev/shm``) and keeps it alive as an open descriptor of
this process for as long as a tensor uses it. A rank on this machine opens ``/proc/<pid>/fd/<fd>``
of the pickling process, which is the same memory, so one payload serves any number of ranks
(torch's own reductions hand each descriptor to one receiver) and no helper process is needed.
The memory is freed when the last tensor using it, here or in a rank, is.

Tensors that stay copies: CUDA and other devices, sparse, quantized, tensor subclasses
(``Parameter`` included), non-leaf tensors that require grad, empty storages, conjugate or
negative views, and storages already mapped another way (a ``from_file`` storage, torch's
``file_system`` strategy). A payload pickled with :func:`dumps` must be read on this machine,
while the tensors it refers to are alive here, by processes allowed to open this one's descriptors
(:func:`processes_here_can_map` says whether they are).

Example::

    payload = dumps({"args": SharedTensors((tensor, model))})   # tensor.is_shared() is now True
    loaded = pickle.loads(payload)                              # in a rank: the same memory
"""
from __future__ import annotations

import ctypes
import io
import itertools
import os
import pickle
import sys
from typing import Any, Dict, Optional, Set, Tuple

import torch

from .by_value import FileKeepingPickler

__all__ = ["SharedTensors", "dumps", "processes_here_can_map"]


class SharedTensors:
    """A box around ``value``: :func:`dumps` ships the plain CPU tensors inside it in shared memory.

    Anywhere else (fork, :func:`notebook_fabric.utilities.by_value.dumps`) it is a plain box and its
    tensors are inherited or copied as usual; a rank reads ``box.value`` either way.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> Tuple[Any, ...]:
        return SharedTensors, (self.value,)


class _StorageHandle:
    """A storage in shared memory, as a rank on this machine finds it: the descriptor of a process."""

    def __init__(self, pid: int, fd: int, nbytes: int) -> None:
        status = os.fstat(fd)
        self.address = (pid, fd, nbytes, status.st_dev, status.st_ino)

    def __reduce__(self) -> Tuple[Any, ...]:
        return open_shared_storage, self.address


def open_shared_storage(pid: int, fd: int, nbytes: int, device: int, inode: int) -> torch.UntypedStorage:
    """In a rank: the storage behind descriptor ``fd`` of process ``pid`` (the one that pickled it)."""
    path = f"/proc/{pid}/fd/{fd}"
    try:
        own = os.open(path, os.O_RDWR)
    except OSError as error:
        raise RuntimeError(
            f"a tensor argument shared by process {pid} cannot be opened in this rank ({path}: {error.strerror}):"
            " shared tensor arguments reach ranks on the machine of the process that launched them, while it runs"
        ) from error
    try:
        status = os.fstat(own)
        if (status.st_dev, status.st_ino) != (device, inode):
            raise RuntimeError(
                f"a tensor argument shared by process {pid} was freed there before this rank opened it"
                f" ({path} is now another file): keep the arguments alive until the launch returns"
            )
        return torch.UntypedStorage._new_shared_fd_cpu(own, nbytes)  # maps its own duplicate of the descriptor
    finally:
        os.close(own)


def rebuild_shared_tensor(storage: torch.UntypedStorage, dtype: torch.dtype, offset: int, size: Tuple[int, ...],
                          stride: Tuple[int, ...], requires_grad: bool) -> torch.Tensor:
    """In a rank: a tensor viewing ``storage`` the way the caller's tensor does."""
    tensor = torch.empty((0,), dtype=dtype).set_(storage, offset, size, stride)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def _marker() -> None:
    return None


class _Begin:
    """Pickled just before a box's value: from here the pickler shares tensors."""


class _End:
    """Pickled just after a box's value: sharing ends."""


def _unbox(begin: None, value: Any, end: None) -> SharedTensors:
    return SharedTensors(value)


class SharingPickler(FileKeepingPickler):
    """:class:`~.by_value.FileKeepingPickler` that ships the tensors inside :class:`SharedTensors` boxes
    through shared memory.

    The pickler writes a box as ``(begin marker, value, end marker)``; pickle visits them in that
    order, so "inside a box" is exactly the span between the markers. A tensor already pickled
    before the box (pickle writes each object once) stays what it was there.
    """

    def __init__(self, file: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        super().__init__(file, protocol=protocol)
        self._depth = 0
        self._module_storages: Set[Optional[int]] = set()  # where parameters and buffers live: copied, never shared
        self._handles: Dict[int, _StorageHandle] = {}  # by storage address: views of one storage share it

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is SharedTensors:
            self._module_storages.update(_module_storage_addresses(obj.value))
            return _unbox, (_Begin(), obj.value, _End())
        if kind is _Begin or kind is _End:
            self._depth += 1 if kind is _Begin else -1
            return _marker, ()
        if isinstance(obj, torch.nn.Module):
            self._module_storages.update(_module_storage_addresses(obj))
        elif kind is torch.Tensor and self._depth > 0:  # a Parameter's own reduction pickles its .data: a plain tensor
            reduced = self._reduce_shared(obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)

    def _reduce_shared(self, tensor: torch.Tensor) -> Optional[Tuple[Any, ...]]:
        if not _shareable(tensor):
            return None
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._module_storages:
            return None
        try:
            fd, nbytes = storage._share_fd_cpu_()  # in place: every view of this storage is shared now
        except RuntimeError:  # mapped another way (the file_system strategy): copy it
            return None
        if fd < 0:  # a mapping without a descriptor (from_file): copy it
            return None
        handle = self._handles.get(storage.data_ptr())
        if handle is None:
            handle = self._handles[storage.data_ptr()] = _StorageHandle(os.getpid(), fd, nbytes)
        return rebuild_shared_tensor, (handle, tensor.dtype, tensor.storage_offset(), tuple(tensor.size()),
                                       tuple(tensor.stride()), tensor.requires_grad)


def dumps(obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """Like :func:`~.by_value.dumps`; tensors inside :class:`SharedTensors` boxes travel in shared memory."""
    with io.BytesIO() as buffer:
        SharingPickler(buffer, protocol=protocol).dump(obj)
        return buffer.getvalue()


def processes_here_can_map() -> bool:
    """Whether other processes of this user can open this process' descriptors (``/proc/<pid>/fd``):
    Linux, and this process dumpable (``prctl(PR_SET_DUMPABLE, 0)``, setuid programs and some
    sandboxes forbid it). Elsewhere :func:`dumps` must not be used: ranks get copies."""
    if not sys.platform.startswith("linux") or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) == 1
    except (OSError, AttributeError):
        return False


_PR_GET_DUMPABLE = 3


def _shareable(tensor: torch.Tensor) -> bool:
    return (tensor.device.type == "cpu" and tensor.layout is torch.strided and not tensor.is_quantized
            and (tensor.is_leaf or not tensor.requires_grad) and not tensor.is_conj() and not tensor.is_neg()
            and tensor.untyped_storage().nbytes() > 0)


def _module_storage_addresses(value: Any) -> Set[Optional[int]]:
    """Where the parameters and buffers of every module in ``value`` (through lists, tuples, sets,
    dicts) keep their data: their storages' addresses."""
    found: Set[Optional[int]] = set()
    pending = [value]
    seen: Set[int] = set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.nn.Module):
            found.update(_storage_address(t) for t in itertools.chain(item.parameters(), item.buffers()))
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    found.discard(None)
    return found


def _storage_address(tensor: torch.Tensor) -> Optional[int]:
    if torch.nn.parameter.is_lazy(tensor) or tensor.device.type != "cpu":  # a lazy module's: no storage yet
        return None
    return tensor.untyped_storage().data_ptr()
