"""Inside a rank: the outbox that owns the channel's sending side, and fd-level output capture.

Only the outbox thread writes to the connection, so a KeyboardInterrupt in the main thread can
never cut a message in half. Output capture points file descriptors 1 and 2 at pipes read by a
thread, so C-level writes are seen too; :meth:`OutputCapture.flush` returns only after
everything written so far was handed to the outbox (results are queued after it).
"""
from __future__ import annotations

import codecs
import ctypes
import io
import logging
import os
import queue
import select
import selectors
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional

_STOP = object()


class Outbox:
    """A queue drained by one thread into the connection. ``put`` never blocks on the socket.

    The thread first connects (``connect()``) so the rank's main thread can go on building its
    Fabric meanwhile; messages put before that wait in the queue. ``on_connected(connection)``
    runs in the thread once connected (the rank starts its control thread there). A rank that
    cannot reach the notebook exits.
    """

    def __init__(self, connect: Callable[[], Connection],
                 on_connected: Callable[[Connection], None] = lambda connection: None) -> None:
        self._connect = connect
        self._on_connected = on_connected
        self.connection: Optional[Connection] = None
        self.connected = threading.Event()
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="notebook-fabric outbox", daemon=True)
        self.broken = False

    def start(self) -> "Outbox":
        self._thread.start()
        return self

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _drain(self) -> None:
        try:
            self.connection = self._connect()
            self.connected.set()
            self._on_connected(self.connection)
        except BaseException as error:  # without the channel a rank is of no use to anyone
            os.write(2, f"notebook-fabric rank: cannot reach the notebook: {error!r}\n".encode())
            os._exit(72)
        while True:
            message = self._queue.get()
            if message is _STOP:
                return
            if self.broken:
                continue
            try:
                self.connection.send(message)
            except (OSError, EOFError, ValueError):
                self.broken = True  # the notebook is gone; the control thread ends the rank


class OutputCapture:
    """Redirects fds 1 and 2 into pipes; ``emit(stream, text)`` receives what arrives, in order.

    ``log_paths`` (``{"stdout": path, "stderr": path}``): every byte of each stream is also appended
    to that file, by the reading thread, as it arrives (the rank's complete output, whatever the
    notebook shows or the channel's fate).
    """

    _MARK = b"\x00nbf-flush:"

    def __init__(self, emit: Callable[[str, str], None], log_paths: Optional[Dict[str, str]] = None) -> None:
        self._emit = emit
        self._log_paths = dict(log_paths or {})
        self._log_fds: Dict[str, int] = {}
        self._readers: Dict[int, str] = {}
        self._decoders: Dict[int, Any] = {}
        self._pending: Dict[int, bytes] = {}
        self._flush_count = 0
        self._flushed: Dict[str, int] = {"stdout": 0, "stderr": 0}
        self._cond = threading.Condition()
        self._reading = threading.Lock()
        self._keep_alive: List[Any] = []  # the replaced stream objects: never finalised (no stray flushes)
        self.original_stderr_fd: Optional[int] = None

    def start(self) -> "OutputCapture":
        for name, path in self._log_paths.items():
            self._log_fds[name] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        _flush_c_stdio()
        for fd, name in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            if name == "stderr":
                self.original_stderr_fd = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            self._readers[read_end] = name
            self._decoders[read_end] = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._pending[read_end] = b""
        self._replace_python_streams()
        _line_buffer_c_stdout()
        threading.Thread(target=self._pump, name="notebook-fabric output", daemon=True).start()
        return self

    def flush(self, timeout: float = 5.0) -> None:
        """Return once everything written to fds 1 and 2 so far reached ``emit``."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
        _flush_c_stdio()
        with self._reading:  # the reader emits what it read before releasing this
            if not select.select(list(self._readers), [], [], 0)[0]:
                return  # nothing unread: everything written so far was emitted already
        with self._cond:
            self._flush_count += 1
            count = self._flush_count
        marker = self._MARK + str(count).encode() + b"\x00"
        for fd in (1, 2):
            try:
                os.write(fd, marker)
            except OSError:
                return
        deadline = time.monotonic() + timeout
        with self._cond:
            while min(self._flushed.values()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _replace_python_streams(self) -> None:
        old = (sys.stdout, sys.stderr)
        self._keep_alive.extend([*old, sys.__stdout__, sys.__stderr__])
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      write_through=True)
        sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
        # Logging handlers set up in the notebook (inherited under fork) keep writing where the user expects.
        for handler in _stream_handlers():
            if handler.stream in old:
                try:
                    handler.stream = sys.stdout if handler.stream is old[0] else sys.stderr
                except AttributeError:  # a handler whose stream is computed (logging.lastResort's)
                    pass

    def _pump(self) -> None:
        selector = selectors.DefaultSelector()
        for fd in self._readers:
            selector.register(fd, selectors.EVENT_READ)
        while True:
            ready = selector.select()
            with self._reading:
                for key, _ in ready:
                    fd = key.fd
                    data = os.read(fd, 65536)
                    if not data:
                        selector.unregister(fd)
                        continue
                    self._consume(fd, self._pending[fd] + data)

    def _consume(self, fd: int, data: bytes) -> None:
        stream = self._readers[fd]
        while True:
            start = data.find(self._MARK)
            if start < 0:
                keep = _partial_marker_suffix(data, self._MARK)
                self._pending[fd] = data[len(data) - keep:] if keep else b""
                self._send(fd, data[:len(data) - keep] if keep else data)
                return
            end = data.find(b"\x00", start + len(self._MARK))
            if end < 0:  # the rest of the marker is still in the pipe
                self._send(fd, data[:start])
                self._pending[fd] = data[start:]
                return
            self._send(fd, data[:start])
            count = int(data[start + len(self._MARK):end] or 0)
            with self._cond:
                self._flushed[stream] = max(self._flushed[stream], count)
                self._cond.notify_all()
            data = data[end + 1:]

    def _send(self, fd: int, data: bytes) -> None:
        if data:
            log_fd = self._log_fds.get(self._readers[fd])
            if log_fd is not None:
                _write_all(log_fd, data)
            text = self._decoders[fd].decode(data)
            if text:
                self._emit(self._readers[fd], text)


def _stream_handlers() -> List[logging.StreamHandler]:
    """Every living logging ``StreamHandler``: from logging's own list of handlers (each handler
    is on it from creation), not by visiting every logger (libraries create hundreds, and each
    one visited in a forked rank is memory the rank copies)."""
    refs = getattr(logging, "_handlerList", None)
    if refs is None:  # not CPython's logging: visit the loggers
        loggers = [logging.getLogger(), *[lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger)]]
        return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]
    handlers = (ref() for ref in list(refs))
    return [h for h in handlers if isinstance(h, logging.StreamHandler)]


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``; a full disk loses log lines, never the rank."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass


def _partial_marker_suffix(data: bytes, mark: bytes) -> int:
    """Length of the longest end of ``data`` that could be the start of ``mark``."""
    for size in range(min(len(mark) - 1, len(data)), 0, -1):
        if mark.startswith(data[-size:]):
            return size
    return 0


def _libc() -> Optional[ctypes.CDLL]:
    from ..processes import libc_handle

    return libc_handle()


def _flush_c_stdio() -> None:
    libc = _libc()
    if libc is not None:
        try:
            libc.fflush(None)
        except AttributeError:
            pass


def _line_buffer_c_stdout() -> None:
    """C ``stdout`` on a pipe is block-buffered; make it line-buffered so C prints arrive live."""
    libc = _libc()
    if libc is None:
        return
    try:
        c_stdout = ctypes.c_void_p.in_dll(libc, "stdout")
        libc.setvbuf(c_stdout, None, 1, 0)  # _IOLBF
    except (ValueError, AttributeError):
        pass
