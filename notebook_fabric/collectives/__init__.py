"""The one collective layer: tensor ops over torch.distributed, collection helpers, tracing."""
from . import ops, trace
from .collections import map_tensors, tensors_to_device
from .debug import CollectiveMismatchError, enable_signature_checks
from .ledger_view import LedgerTable, last_ledger
from .trace import get_tracer, set_tracer

__all__ = [
    "ops", "trace", "map_tensors", "tensors_to_device", "get_tracer", "set_tracer",
    "CollectiveMismatchError", "enable_signature_checks", "LedgerTable", "last_ledger",
]
