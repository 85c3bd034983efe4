"""Checkpoints: atomic streamed writes (``io``) and in-place restore of live objects (``state``)."""
from . import io, state
from .io import atomic_save, load

__all__ = ["io", "state", "atomic_save", "load"]
