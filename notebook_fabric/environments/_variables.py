"""Reading scheduler variables with errors that name the variable and the fix.

Shared by the TorchElastic, SLURM and MPI environments; not public API.
"""
from __future__ import annotations

import os
import zlib
from typing import Optional, Sequence


def first_set(names: Sequence[str]) -> Optional[str]:
    """The first of ``names`` that is set in the environment, or ``None``."""
    for name in names:
        if name in os.environ:
            return name
    return None


def read_str(names: Sequence[str], who: str, hint: str) -> str:
    """The value of the first of ``names`` that is set; ``ValueError`` naming them all if none is."""
    name = first_set(names)
    if name is None:
        wanted = " or ".join(names)
        raise ValueError(f"{who} needs the environment variable {wanted}, which is not set. {hint}")
    return os.environ[name]


def read_int(names: Sequence[str], who: str, hint: str, minimum: int = 0) -> int:
    """An integer variable (the first of ``names`` that is set), at least ``minimum``."""
    name = first_set(names)
    text = read_str(names, who, hint)
    return to_int(name or names[0], text, minimum)


def to_int(name: str, text: str, minimum: int = 0) -> int:
    """``int(text)`` with a ``ValueError`` that names the variable ``name`` it came from."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer.") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}.")
    return value


def check_rank(rank_name: str, rank: int, size_name: str, size: int) -> None:
    """``ValueError`` unless ``0 <= rank < size``, naming both variables."""
    if not 0 <= rank < size:
        raise ValueError(
            f"{rank_name}={rank} is outside the job: {size_name}={size} allows ranks 0..{size - 1}."
            " The scheduler's variables contradict each other; check how the job was started."
        )


def read_port(name: str) -> Optional[int]:
    """The port in variable ``name`` (1..65535), or ``None`` when it is unset."""
    if name not in os.environ:
        return None
    port = to_int(name, os.environ[name], minimum=1)
    if port > 65535:
        raise ValueError(f"{name}={port} is not a valid TCP port (1..65535).")
    return port


def require_port(name: str, who: str, hint: str) -> int:
    """The port in variable ``name``; ``ValueError`` naming it when it is unset or invalid."""
    port = read_port(name)
    if port is None:
        read_str([name], who, hint)  # raises, naming the variable
    return int(port)  # type: ignore[arg-type]


def port_from_job_id(job_id: str, base: int = 10000, span: int = 20000) -> int:
    """A port every node of one job derives alike from the job's id (``base <= port < base + span``)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return base + number % span
