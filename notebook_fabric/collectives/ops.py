"""Tensor collectives over ``torch.distributed``: the only place that calls it, so every call is traced.

Each function adds nothing torch.distributed does not need: no barrier, no extra copy beyond the
one that keeps the caller's tensor untouched.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .trace import get_tracer, traced

REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,  # divided afterwards: gloo has no AVG
    "avg": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def normalize_reduce_op(reduce_op: Union[str, "dist.ReduceOp", None]) -> tuple[str, Any]:
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


def _group_size(group: Optional[Any]) -> int:
    return dist.get_world_size(group)


def all_reduce(tensor: Tensor, reduce_op: Union[str, Any, None] = "mean", group: Optional[Any] = None) -> Tensor:
    """A new tensor holding the reduction of ``tensor`` over ``group``; the input is left untouched."""
    name, op = normalize_reduce_op(reduce_op)
    result = tensor.clone()
    if name == "mean" and not result.is_floating_point() and not result.is_complex():
        result = result.to(torch.get_default_dtype())
    tracer = get_tracer()
    if tracer is None:
        dist.all_reduce(result, op=op, group=group)
    else:
        meta = {"shapes": [tuple(tensor.shape)], "dtypes": [str(tensor.dtype)], "reduce_op": name}
        with traced(tracer, "all_reduce", meta):
            dist.all_reduce(result, op=op, group=group)
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
    tracer = get_tracer()
    if tracer is None:
        _all_gather_single(output, flat, group=group)
    else:
        meta = {"shapes": [tuple(tensor.shape)], "dtypes": [str(tensor.dtype)]}
        with traced(tracer, "all_gather", meta):
            _all_gather_single(output, flat, group=group)
    return output.view(size, *tensor.shape)


# torch >= 2.11 renamed all_gather_into_tensor; both gather equal-sized flat chunks into one buffer
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
        tracer = get_tracer()
        if tracer is None:
            dist.all_reduce(grad, group=ctx.group)
        else:
            meta = {"shapes": [tuple(grad.shape)], "dtypes": [str(grad.dtype)], "reduce_op": "sum"}
            with traced(tracer, "all_reduce", meta):
                dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def broadcast_tensor(tensor: Tensor, src: int = 0, group: Optional[Any] = None) -> Tensor:
    """``src``'s tensor on every rank (a new tensor; the caller's is untouched on non-source ranks)."""
    result = tensor.clone() if dist.get_rank() != src else tensor
    tracer = get_tracer()
    if tracer is None:
        dist.broadcast(result, src, group=group)
    else:
        meta = {"shapes": [tuple(tensor.shape)], "dtypes": [str(tensor.dtype)], "src": src}
        with traced(tracer, "broadcast", meta):
            dist.broadcast(result, src, group=group)
    return result


def broadcast_object(obj: Any, src: int = 0, group: Optional[Any] = None, device: Optional[torch.device] = None) -> Any:
    """Any picklable object from ``src`` to every rank."""
    box = [obj]
    tracer = get_tracer()
    if tracer is None:
        dist.broadcast_object_list(box, src, group=group, device=device)
    else:
        with traced(tracer, "broadcast", {"shapes": [], "dtypes": ["object"], "src": src}):
            dist.broadcast_object_list(box, src, group=group, device=device)
    return box[0]


def all_gather_object(obj: Any, group: Optional[Any] = None) -> list:
    """Every rank's picklable ``obj``, as a list indexed by rank."""
    out: list = [None] * _group_size(group)
    tracer = get_tracer()
    if tracer is None:
        dist.all_gather_object(out, obj, group=group)
    else:
        with traced(tracer, "all_gather", {"shapes": [], "dtypes": ["object"]}):
            dist.all_gather_object(out, obj, group=group)
    return out


def barrier(name: Optional[str] = None, group: Optional[Any] = None, device_ids: Optional[list[int]] = None) -> None:
    """Wait until every rank of ``group`` arrives. ``name`` shows in traces and stall reports."""
    kwargs = {"device_ids": device_ids} if device_ids else {}
    tracer = get_tracer()
    if tracer is None:
        dist.barrier(group=group, **kwargs)
    else:
        with traced(tracer, "barrier", {"name": name, "shapes": [], "dtypes": []}):
            dist.barrier(group=group, **kwargs)
