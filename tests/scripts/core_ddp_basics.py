"""2 CPU ranks with strategy="ddp" and fabric.launch() (the script re-runs itself for rank 1).

Runs many checks in one job (each start costs seconds) and prints one NFTEST line per check and
rank; tests/test_core_ddp.py asserts on them. Usage:

    python core_ddp_basics.py --out DIR --load-from ONE_PROCESS.ckpt --raw PLAIN_STATE_DICT.pt
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from core_common import digest, emit, make_model, state_digest
from notebook_fabric import Fabric, seed_everything
from notebook_fabric.loggers import CSVLogger
from notebook_fabric.strategies import DDPStrategy

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--load-from", required=True)
parser.add_argument("--raw", required=True)
args = parser.parse_args()
out = Path(args.out)

# only the process the test started seeds (with a seed of its own); rank 1, re-run by launch(), must inherit it
if "RANK" not in os.environ:
    seed_everything(int.from_bytes(os.urandom(3), "little"))

# one folder per process: rank 0's gets metrics.csv, rank 1's must never be created
logger = CSVLogger(out / "logs" / str(os.getpid()), name="", version=0, flush_logs_every_n_steps=1)
fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", loggers=logger)
fabric.launch()
rank = fabric.global_rank

emit(
    rank, "properties", global_rank=fabric.global_rank, local_rank=fabric.local_rank, node_rank=fabric.node_rank,
    world_size=fabric.world_size, is_global_zero=fabric.is_global_zero, device=str(fabric.device),
    strategy=type(fabric.strategy).__name__, start_method=fabric.strategy.start_method,
    initialized=dist.is_initialized(), backend=dist.get_backend(), dist_rank=dist.get_rank(),
    dist_world_size=dist.get_world_size(), pid=os.getpid(), ppid=os.getppid(),
    logger=type(fabric.logger).__name__, num_loggers=len(fabric.loggers),
)  # fmt: skip

seed = fabric.seed_everything()  # no seed given: the one the job was started with
emit(rank, "seed", seed=seed, draw=torch.rand(3).tolist())

# ----- setup(): rank 0's weights everywhere, then identical after DDP steps --------------------
torch.manual_seed(100 + rank)  # a different initialisation on each rank
model = make_model()
model.tag = "mine"
initial = digest(model.parameters())
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
model, optimizer = fabric.setup(model, optimizer)
after_setup = digest(model.parameters())
torch.manual_seed(rank)  # different data on each rank
for _ in range(3):
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    fabric.backward(loss)
    optimizer.step()
emit(
    rank, "setup", initial=initial, after_setup=after_setup, after_steps=digest(model.parameters()),
    is_ddp=isinstance(model._forward_module, DistributedDataParallel), sgd=isinstance(optimizer, torch.optim.SGD),
    state_keys=sorted(model.state_dict()), tag=model.tag, module_is_plain=type(model.module).__name__,
)  # fmt: skip

# setup_module + setup_optimizers: the same, in two calls
torch.manual_seed(200 + rank)
module2 = fabric.setup_module(make_model())
optimizer2 = fabric.setup_optimizers(torch.optim.Adam(module2.parameters(), lr=0.01))
fabric.backward(module2(torch.randn(8, 4)).sum())
optimizer2.step()
emit(rank, "setup_module", params=digest(module2.parameters()), adam=isinstance(optimizer2, torch.optim.Adam),
     is_ddp=isinstance(module2._forward_module, DistributedDataParallel))  # fmt: skip

# ----- data: disjoint shards whose union is the dataset; a new order each epoch -----------------
dataset = TensorDataset(torch.arange(20))
loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=3, shuffle=True))
epochs = [[i for (batch,) in loader for i in batch.tolist()] for _ in range(2)]
ordered_a, ordered_b = fabric.setup_dataloaders(DataLoader(dataset, batch_size=4), DataLoader(dataset, batch_size=5))
unsharded = fabric.setup_dataloaders(DataLoader(dataset, batch_size=4), use_distributed_sampler=False)
emit(
    rank, "data", epochs=epochs, sampler=type(loader.sampler).__name__, num_batches=len(loader),
    ordered_a=[i for (batch,) in ordered_a for i in batch.tolist()],
    ordered_b=[i for (batch,) in ordered_b for i in batch.tolist()],
    unsharded=[i for (batch,) in unsharded for i in batch.tolist()],
    unsharded_sampler=type(unsharded.sampler).__name__,
    distributed=isinstance(loader.sampler, DistributedSampler),
)  # fmt: skip

# ----- all_reduce -------------------------------------------------------------------------------
tensor = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
before = tensor.clone()
reduced = {op: fabric.all_reduce(tensor, reduce_op=op).tolist() for op in ("sum", "mean", "max", "min")}
returned = fabric.all_reduce(tensor, reduce_op="sum")
collection = fabric.all_reduce(
    {"a": torch.tensor(float(rank)), "b": [torch.tensor([rank, 2 * rank]), 3.0 * rank], "c": (torch.tensor(rank + 1),)},
    reduce_op="sum",
)
try:
    fabric.all_reduce(tensor, reduce_op="median")
    bad_op = None
except ValueError as error:
    bad_op = str(error)
# spec/000's logging loop: all_reduce(loss) for the log, then backward(loss) on this rank's own loss
net = nn.Linear(2, 1, bias=False)
with torch.no_grad():
    net.weight.fill_(1.0)
loss = net(torch.full((1, 2), float(rank + 1))).sum()  # 2.0 on rank 0, 4.0 on rank 1
sync_loss = fabric.all_reduce(loss, reduce_op="mean")
fabric.backward(loss)
spec_logging = {"loss": loss.item(), "sync_loss": sync_loss.item(), "grad": net.weight.grad.tolist()}
emit(
    rank, "all_reduce", reduced=reduced, spec_logging=spec_logging, unchanged=torch.equal(tensor, before), same_object=returned is tensor,
    default_mean=fabric.all_reduce(torch.tensor(float(rank))).item(),
    int_mean=fabric.all_reduce(torch.tensor(rank + 1), reduce_op="mean").item(),
    list_max=[t.tolist() for t in fabric.all_reduce([torch.tensor([rank, -rank]), torch.tensor(rank * 2.5)], reduce_op="max")],
    collection={"a": collection["a"].item(), "b": [collection["b"][0].tolist(), collection["b"][1].item()],
                "c_is_tuple": isinstance(collection["c"], tuple), "c": collection["c"][0].item()},
    bad_op=bad_op,
)  # fmt: skip

# ----- all_gather -------------------------------------------------------------------------------
gathered = fabric.all_gather(torch.tensor([rank, rank + 10]))
scalars = fabric.all_gather(torch.tensor(float(rank)))
local = torch.randn(3, 2)
matrix = fabric.all_gather(local)
nested = fabric.all_gather({"x": torch.full((2, 2), rank), "y": [torch.tensor(rank * 1.0), 0.5 + rank]})
leaf = torch.tensor([rank + 1.0], requires_grad=True)
with_grads = fabric.all_gather(leaf, sync_grads=True)
(with_grads.squeeze(1) * torch.tensor([1.0, 2.0])).sum().backward()
emit(
    rank, "all_gather", gathered=gathered.tolist(), scalars=scalars.tolist(), matrix_shape=list(matrix.shape),
    own_row=torch.equal(matrix[rank], local), nested_x_shape=list(nested["x"].shape), nested_x=nested["x"].tolist(),
    nested_y=[nested["y"][0].tolist(), nested["y"][1].tolist()], sync_grads_value=with_grads.squeeze(1).tolist(),
    requires_grad=with_grads.requires_grad, leaf_grad=leaf.grad.tolist(),
    no_sync_requires_grad=fabric.all_gather(leaf).requires_grad,
)  # fmt: skip

# ----- broadcast --------------------------------------------------------------------------------
config = {"learning_rate": 0.001, "batch_size": 32} if fabric.is_global_zero else None
config = fabric.broadcast(config, src=0)
from_one = fabric.broadcast({"from": rank, "t": torch.tensor([rank, rank])}, src=1)
emit(
    rank, "broadcast", tensor=fabric.broadcast(torch.tensor([rank * 10 + 5.0])).tolist(),
    tensor_src1=fabric.broadcast(torch.tensor([rank * 10 + 5.0]), src=1).tolist(), config=config,
    from_one={"from": from_one["from"], "t": from_one["t"].tolist()}, string=fabric.broadcast(f"rank{rank}", src=1),
)  # fmt: skip

# ----- barrier(name): rank 1 writes late, rank 0 reads after the barrier ------------------------
marker = out / "barrier.txt"
if rank == 1:
    time.sleep(0.5)
    marker.write_text("written by rank 1")
fabric.barrier("after_write")
emit(rank, "barrier", seen=marker.exists() and marker.read_text())

# ----- rank_zero_first: rank 0 prepares, the other reads what it prepared -----------------------
contents = []
for local_flag in (False, True):
    prepared = out / f"prepared_{local_flag}.txt"
    with fabric.rank_zero_first(local=local_flag):
        if rank == 0:
            time.sleep(0.3)
            prepared.write_text(f"prepared by rank 0 (local={local_flag})")
        contents.append(prepared.read_text())
emit(rank, "rank_zero_first", contents=contents)

# ----- no_backward_sync: local gradients inside, averaged ones after a synced backward ----------
linear = fabric.setup(nn.Linear(4, 1))
inputs = torch.full((2, 4), float(rank + 1))
with fabric.no_backward_sync(linear, enabled=True):
    fabric.backward(linear(inputs).sum())
inside = fabric.all_gather(linear.weight.grad.clone())
linear.zero_grad()
fabric.backward(linear(inputs).sum())
synced = fabric.all_gather(linear.weight.grad.clone())
linear.zero_grad()
with fabric.no_backward_sync(linear, enabled=False):
    fabric.backward(linear(inputs).sum())
disabled = fabric.all_gather(linear.weight.grad.clone())
emit(
    rank, "no_backward_sync", inside=inside[:, 0, 0].tolist(), synced=synced[:, 0, 0].tolist(),
    disabled=disabled[:, 0, 0].tolist(),
)  # fmt: skip

# ----- print and log: rank 0 only ---------------------------------------------------------------
fabric.print("FABRIC-PRINT from rank", rank)
fabric.log("loss", torch.tensor(0.25), step=0)
fabric.log_dict({"acc": 0.75, "count": torch.tensor(3)}, step=1)
emit(rank, "log", pid=os.getpid())

# ----- DDPStrategy keyword arguments reach DDP (a second Fabric joins the same process group) ---
strategy = DDPStrategy(
    process_group_backend="gloo", timeout=timedelta(minutes=7), find_unused_parameters=True, gradient_as_bucket_view=True
)
kw_fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
kw_fabric.launch()


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


net = WithUnused()
unused_model, unused_optimizer = kw_fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
for _ in range(2):  # without find_unused_parameters=True the second forward raises in DDP
    unused_optimizer.zero_grad()
    kw_fabric.backward(unused_model(torch.randn(2, 4)).sum())
    unused_optimizer.step()
ddp = unused_model._forward_module
emit(
    rank, "ddp_kwargs", find_unused_parameters=ddp.find_unused_parameters,
    gradient_as_bucket_view=ddp.gradient_as_bucket_view, backend=kw_fabric.strategy.process_group_backend,
    timeout=kw_fabric.strategy.timeout.total_seconds(), world_size=kw_fabric.world_size, global_rank=kw_fabric.global_rank,
)  # fmt: skip

# ----- checkpoints: save on 2 ranks (the test loads it on 1) ------------------------------------
fabric.save(out / "two_ranks.ckpt", {"model": model, "optimizer": optimizer, "step": 3, "meta": {"note": "2 ranks"}})
emit(rank, "saved", params=state_digest(model), exists=(out / "two_ranks.ckpt").exists())

# load on 2 ranks what the test saved on 1 process
torch.manual_seed(400 + rank)
fresh = make_model()
fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.5)
fresh, fresh_optimizer = fabric.setup(fresh, fresh_optimizer)
state = {"model": fresh, "optimizer": fresh_optimizer, "epoch": 0}
remainder = fabric.load(args.load_from, state)
loaded = {
    "params": state_digest(fresh), "epoch": state["epoch"], "remainder": remainder,
    "lr": fresh_optimizer.param_groups[0]["lr"], "momentum": fresh_optimizer.param_groups[0]["momentum"],
    "inner_lr": fresh_optimizer.optimizer.param_groups[0]["lr"],
    "buffers": digest(fresh_optimizer.state[p]["momentum_buffer"] for p in fresh.parameters()),
}  # fmt: skip
everything = fabric.load(args.load_from)
try:
    fabric.load(args.load_from, {"model": fresh, "not_in_file": 1})
    strict_error = None
except KeyError as error:
    strict_error = str(error)
lenient = {"model": fresh, "not_in_file": 1}
lenient_remainder = fabric.load(args.load_from, lenient, strict=False)
torch.manual_seed(rank)
fresh_optimizer.zero_grad()
fabric.backward(fresh(torch.randn(4, 4)).sum())
fresh_optimizer.step()
raw_target = fabric.setup(make_model())
fabric.load_raw(args.raw, raw_target)
plain_target = make_model()
fabric.load_raw(args.raw, plain_target)
emit(
    rank, "loaded", **loaded, everything_keys=sorted(everything), strict_error=strict_error,
    lenient_value=lenient["not_in_file"], lenient_remainder=sorted(lenient_remainder),
    after_step=digest(fresh.parameters()), raw_wrapped=state_digest(raw_target), raw_plain=state_digest(plain_target),
)  # fmt: skip
emit(rank, "done")
