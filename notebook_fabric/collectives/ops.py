"""Tensor collectives over ``torch.distributed``: the strategies' collectives go through here, so each is traced.

(Not every call to torch.distributed does: joining and leaving the process group, DeepSpeed's and
torch_xla's own collectives, and the debugger's signature exchange in :mod:`.debug` call it directly.)

Each function adds nothing torch.distributed does not need: no barrier, no extra copy beyond the
one that keeps the caller's tensor untouched. With no tracer installed, tracing costs one lookup.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import trace as _trace
from .trace import run_traced as _run

REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,  # divided afterwards: gloo has no AVG
    "avg": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}

# torch >= 2.11 renamed all_gather_into_tensor; both gather equal-sized flat chunks into one buffer
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


#: the names as written most often, looked up before anything else (this runs on every all_reduce)
_NORMALIZED = {name: ("mean" if name == "avg" else name, op) for name, op in REDUCE_OPS.items()}


def normalize_reduce_op(reduce_op: Union[str, "dist.ReduceOp", None]) -> tuple[str, Any]:
    """``(name, torch ReduceOp)`` for ``reduce_op``; ``ValueError`` lists the supported names."""
    if reduce_op.__class__ is str:
        known = _NORMALIZED.get(reduce_op)
        if known is not None:
            return known
    if reduce_op is None:
        return "mean", dist.ReduceOp.SUM
    if isinstance(reduce_op, str):
        key = reduce_op.lower()
        if key not in REDUCE_OPS:
            raise ValueError(f"reduce_op={reduce_op!r} is not supported; choose one of {sorted(set(REDUCE_OPS) - {'avg'})}")
        return ("mean" if key == "avg" else key), REDUCE_OPS[key]
    if reduce_op == dist.ReduceOp.AVG:
        return "mean", dist.ReduceOp.SUM
    return str(reduce_op).split(".")[-1].lower(), reduce_op


_WORLD_SIZE: list = [None, 0]  # [weak reference to the world group, its size]: a group's size never changes


def _group_size(group: Optional[Any]) -> int:
    if group is not None:
        return dist.get_world_size(group)
    world = dist.group.WORLD
    known = _WORLD_SIZE[0]
    if known is not None and world is not None and known() is world:
        return _WORLD_SIZE[1]
    size = dist.get_world_size()
    if world is not None:
        _WORLD_SIZE[:] = [weakref.ref(world), size]
    return size


def _meta(group: Optional[Any], tensor: Optional[Tensor] = None, **extra: Any) -> dict:
    shapes = [tensor.shape] if tensor is not None else []  # a torch.Size is a tuple
    dtypes = [str(tensor.dtype)] if tensor is not None else ["object"]
    return {"group": group, "group_size": _group_size(group), "shapes": shapes, "dtypes": dtypes, **extra}


def all_reduce(tensor: Tensor, reduce_op: Union[str, Any, None] = "mean", group: Optional[Any] = None) -> Tensor:
    """A new tensor holding the reduction of ``tensor`` over ``group``; the input is left untouched."""
    name, op = normalize_reduce_op(reduce_op)
    result = tensor.clone()
    if name == "mean" and not result.is_floating_point() and not result.is_complex():
        result = result.to(torch.get_default_dtype())
    if _trace._tracer is None:  # nothing traces this process: skip the closures tracing needs
        dist.all_reduce(result, op=op, group=group)
    else:
        _run("all_reduce", lambda: dist.all_reduce(result, op=op, group=group),
             lambda: {"group": group, "group_size": _group_size(group), "shapes": [tensor.shape],  # one literal:
                      "dtypes": [str(tensor.dtype)], "reduce_op": name})  # no kwargs dict to merge
    if name == "mean":
        result.div_(_group_size(group))
    return result


def all_gather(tensor: Tensor, group: Optional[Any] = None) -> Tensor:
    """Every rank's ``tensor`` stacked on a new first dimension (same shape on every rank).

    The result carries no autograd history (use :func:`all_gather_with_grads` for that); the input
    may require grad, e.g. a model's output.
    """
    size = _group_size(group)
    flat = tensor.detach().contiguous().reshape(-1)
    output = flat.new_empty(size * flat.numel())
    _run("all_gather", lambda: _all_gather_single(output, flat, group=group), lambda: _meta(group, tensor))
    return output.view(size, *tensor.shape)


def all_gather_with_grads(tensor: Tensor, group: Optional[Any] = None) -> Tensor:
    """Like :func:`all_gather`, but differentiable: each rank's input receives the sum over ranks of the
    gradient flowing into its slice of the result."""
    return _AllGatherWithGrads.apply(tensor, group)


class _AllGatherWithGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Optional[Any]) -> Tensor:  # noqa: ANN401
        ctx.group = group
        return all_gather(tensor, group=group)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:  # noqa: ANN401
        grad = grad_output.contiguous().clone()
        group = ctx.group
        _run("all_reduce", lambda: dist.all_reduce(grad, group=group), lambda: _meta(group, grad, reduce_op="sum"))
        return grad[dist.get_rank(group)], None


def broadcast_tensor(tensor: Tensor, src: int = 0, group: Optional[Any] = None) -> Tensor:
    """``src``'s tensor on every rank (a new tensor; the caller's is untouched on non-source ranks)."""
    result = tensor.clone() if dist.get_rank() != src else tensor
    _run("broadcast", lambda: dist.broadcast(result, src, group=group), lambda: _meta(group, tensor, src=src))
    return result


def broadcast_object(obj: Any, src: int = 0, group: Optional[Any] = None, device: Optional[torch.device] = None) -> Any:
    """Any picklable object from ``src`` to every rank."""
    box = [obj]
    _run(
        "broadcast",
        lambda: dist.broadcast_object_list(box, src, group=group, device=device),
        lambda: _meta(group, src=src),
    )
    return box[0]


def all_gather_object(obj: Any, group: Optional[Any] = None) -> list:
    """Every rank's picklable ``obj``, as a list indexed by rank."""
    out: list = [None] * _group_size(group)
    _run("all_gather", lambda: dist.all_gather_object(out, obj, group=group), lambda: _meta(group))
    return out


def barrier(name: Optional[str] = None, group: Optional[Any] = None, device_ids: Optional[list[int]] = None) -> None:
    """Wait until every rank of ``group`` arrives. ``name`` shows in traces and stall reports."""
    kwargs = {"device_ids": device_ids} if device_ids else {}
    _run("barrier", lambda: dist.barrier(group=group, **kwargs), lambda: {**_meta(group), "dtypes": [], "name": name})
