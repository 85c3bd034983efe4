"""``notebook-fabric run``: start a script's ranks through torchrun (``torch.distributed.run``).

The command turns its flags into torchrun arguments, exports the Fabric settings for the ranks
(see :mod:`notebook_fabric.cli_settings`) and runs torchrun's own launcher in this process. The
``Fabric()`` in every rank sees the torchrun variables (``TorchElasticEnvironment``) and only
joins the process group in ``fabric.launch()``. Also reachable as ``python -m notebook_fabric run``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional, Sequence

from .accelerators import ACCELERATOR_CHOICES
from .cli_settings import export_cli_settings
from .strategies.start_methods import is_pool_start_method, start_method_named_by

PROG = "notebook-fabric"
MULTI_NODE_DEFAULT_PORT = 29500


def build_parser() -> argparse.ArgumentParser:
    """The ``notebook-fabric`` parser with its ``run`` sub-command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Scale a Fabric training script to several processes, devices and machines."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run = commands.add_parser(
        "run",
        help="run a script on several devices / nodes (through torch.distributed.run)",
        description=(
            "Run SCRIPT once per device on this machine, through PyTorch's torch.distributed.run\n"
            "(torchrun). The Fabric() inside the script picks up these settings, so its own\n"
            "arguments may be left out; where both are given the command line wins and a warning\n"
            "names the two values. For several machines run the command once on each, with the\n"
            "same --num-nodes/--main-address/--main-port and that machine's --node-rank."
        ),
        epilog=(
            "example: notebook-fabric run --accelerator cuda --devices 4 train.py --lr 0.1\n"
            "two machines: notebook-fabric run --devices 4 --num-nodes 2 --node-rank 0 "
            "--main-address 10.0.0.1 train.py  (and --node-rank 1 on the other)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(run)
    return parser


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of ``notebook-fabric run``; each is documented in ``--help``."""
    run.add_argument(
        "--accelerator", choices=ACCELERATOR_CHOICES, default=None,
        help="hardware for the ranks: cpu (every device is a process), cuda/gpu, mps."
        " Left out: the script's Fabric(accelerator=...), and 'auto' for counting --devices.",
    )
    run.add_argument(
        "--strategy", default=None, metavar="NAME",
        help="distributed strategy, e.g. ddp, fsdp, deepspeed. Left out: the script's choice."
        " Strategies that start their own processes (ddp_spawn, ddp_fork, ddp_notebook, any *_spawn,"
        " *_fork, *_notebook) and dp are refused: this command already starts one process per device.",
    )
    run.add_argument(
        "--devices", default="1",
        help="devices per node: a count (2), -1 or auto for all, or indices (0,1)."
        " One process is started per device; with --accelerator cpu a device is a process. Default: 1.",
    )
    run.add_argument(
        "--num-nodes", type=int, default=1, metavar="N", help="number of machines in the job. Default: 1.",
    )
    run.add_argument(
        "--node-rank", type=int, default=0, metavar="N",
        help="index of this machine, 0 .. num-nodes-1; run the command once per machine. Default: 0.",
    )
    run.add_argument(
        "--main-address", default="127.0.0.1", metavar="HOST",
        help="address of the machine with --node-rank 0, reachable from every node. Default: 127.0.0.1.",
    )
    run.add_argument(
        "--main-port", type=int, default=None, metavar="PORT",
        help="port on the main machine for the rendezvous, the same on every node. Default: a free"
        f" port on one node; {MULTI_NODE_DEFAULT_PORT} with several nodes.",
    )
    run.add_argument(
        "--precision", default=None,
        help="numeric precision, e.g. 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true, 64-true."
        " Left out: the script's Fabric(precision=...).",
    )
    run.add_argument("script", metavar="SCRIPT", help="the Python script to run on every rank")
    run.add_argument(
        "script_args", metavar="SCRIPT ARGS", nargs=argparse.REMAINDER,
        help="arguments passed to SCRIPT unchanged",
    )


def refusal(strategy: Optional[str]) -> Optional[str]:
    """Why ``strategy`` cannot run under ``notebook-fabric run``, or ``None`` if it can."""
    if strategy is None:
        return None
    name = strategy.strip().lower()
    if name == "dp":
        return (
            "--strategy dp runs every device inside one process, but notebook-fabric run starts one"
            " process per device. Use --strategy ddp (or fsdp, deepspeed, ...)."
        )
    if is_pool_start_method(start_method_named_by(name)):
        return (
            f"--strategy {strategy} starts its own processes from inside the script, but notebook-fabric"
            " run already starts one process per device through torchrun. Use --strategy ddp"
            f" (or fsdp, deepspeed, ...), or run the script with plain `python` so that {strategy}"
            " starts its ranks itself."
        )
    return None


def resolve_devices(accelerator: Optional[str], devices: str) -> tuple[int, str]:
    """(processes per node, the devices value to hand to the ranks) for ``--devices``.

    Raises ``ValueError`` with the fix when the accelerator is missing on this machine or the
    devices cannot be had.
    """
    import torch  # deferred: `--help` should not pay for it

    from .accelerators import resolve_accelerator

    name = (accelerator or "auto").lower()
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ValueError(
            f"--accelerator {name} was requested but this machine has no usable CUDA GPU"
            " (torch.cuda.is_available() is False). Use --accelerator cpu to run the ranks as CPU processes."
        )
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError("--accelerator mps was requested but MPS is not available here. Use --accelerator cpu.")
    if name == "tpu":
        raise ValueError(
            "--accelerator tpu: TPU ranks are started by torch_xla, not torchrun. Run the script with"
            " plain `python` and Fabric(accelerator='tpu')."
        )
    try:
        indices = resolve_accelerator(name).parse_devices(devices)
    except ValueError as error:
        raise ValueError(f"--devices {devices}: {error}") from None
    explicit_indices = "," in devices or devices.strip().startswith("[")
    handed = ",".join(map(str, indices)) if explicit_indices else str(len(indices))
    return len(indices), handed


def resolve_precision_flag(precision: Optional[str]) -> Optional[str]:
    """The canonical name for ``--precision`` (``bf16`` -> ``bf16-mixed``); ``ValueError`` lists the choices."""
    if precision is None:
        return None
    from .precision import normalize_precision

    try:
        return normalize_precision(precision)
    except ValueError as error:
        raise ValueError(f"--precision {precision}: {error}") from None


def torchrun_arguments(args: argparse.Namespace, processes: int) -> list[str]:
    """The ``torch.distributed.run`` command line for these flags (static rendezvous, no restarts)."""
    argv = [
        f"--nnodes={args.num_nodes}",
        f"--nproc_per_node={processes}",
        "--max_restarts=0",
    ]
    if args.num_nodes == 1 and args.main_port is None:
        argv.append("--standalone")  # torchrun hosts the rendezvous on a free port of its own
    else:
        port = args.main_port if args.main_port is not None else MULTI_NODE_DEFAULT_PORT
        argv += [
            "--rdzv_backend=static",
            f"--node_rank={args.node_rank}",
            f"--master_addr={args.main_address}",
            f"--master_port={port}",
        ]
    return argv + [args.script, *args.script_args]


def check_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` naming the flag for contradictory or impossible values."""
    reason = refusal(args.strategy)
    if reason:
        raise ValueError(reason)
    if args.num_nodes < 1:
        raise ValueError(f"--num-nodes {args.num_nodes} must be at least 1.")
    if not 0 <= args.node_rank < args.num_nodes:
        raise ValueError(
            f"--node-rank {args.node_rank} is outside 0..{args.num_nodes - 1} (--num-nodes {args.num_nodes})."
        )
    if args.main_port is not None and not 1 <= args.main_port <= 65535:
        raise ValueError(f"--main-port {args.main_port} is not a TCP port (1..65535).")
    if not os.path.isfile(args.script):
        raise ValueError(f"SCRIPT {args.script!r} was not found (looked in {os.getcwd()}).")


def run_command(args: argparse.Namespace) -> int:
    """Check ``args``, export the settings, and run torchrun; the exit status of the job."""
    check_arguments(args)
    processes, devices = resolve_devices(args.accelerator, args.devices)
    precision = resolve_precision_flag(args.precision)
    export_cli_settings(
        {
            "accelerator": args.accelerator,
            "strategy": args.strategy,
            "devices": devices,
            "num_nodes": args.num_nodes,
            "precision": precision,
        }
    )
    share_cpu_threads(processes)
    # torchrun's ranks are clients of the agent's store for the whole job: a group re-created after
    # destroy_process_group() must meet under fresh keys (strategies/rendezvous_rounds.py)
    from .strategies.rendezvous_rounds import HOSTED_STORE_VARIABLE

    os.environ[HOSTED_STORE_VARIABLE] = "1"
    return launch_torchrun(torchrun_arguments(args, processes), node_rank=args.node_rank)


def share_cpu_threads(processes: int) -> None:
    """Unless ``OMP_NUM_THREADS`` is set, give each of this node's ranks an equal share of the cores.

    torchrun would otherwise set 1 thread per rank (with a banner); an equal share keeps CPU
    ranks fast without oversubscribing the machine.
    """
    if processes <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    print(
        f"{PROG} run: OMP_NUM_THREADS={threads} for each of the {processes} ranks on this node"
        " (cores / ranks); export OMP_NUM_THREADS to choose another value.",
        file=sys.stderr, flush=True,
    )


def launch_torchrun(argv: list[str], node_rank: int = 0) -> int:
    """Run ``torch.distributed.run`` in this process; report a failed rank by name."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as error:
        print(error.format_msg(), file=sys.stderr)
        rank, failure = error.get_first_failure()
        print(f"{PROG} run: {describe_failure(rank, failure.local_rank, node_rank, failure.exitcode)}",
              file=sys.stderr, flush=True)
        return failure.exitcode if 0 < failure.exitcode < 256 else 1
    except SignalException as error:
        name = signal.Signals(error.sigval).name
        print(f"{PROG} run: stopped by {name}; torchrun ended every rank of this node.", file=sys.stderr, flush=True)
        return 128 + int(error.sigval)
    except RendezvousError as error:
        print(
            f"{PROG} run: the ranks could not meet ({type(error).__name__}: {error}). Every node must run"
            " the command with the same --num-nodes, --main-address and --main-port and its own --node-rank.",
            file=sys.stderr, flush=True,
        )
        return 1
    return 0


def describe_failure(rank: int, local_rank: int, node_rank: int, exitcode: int) -> str:
    """One line naming the rank that failed first and how it ended."""
    if exitcode < 0:
        try:
            how = f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return (
        f"rank {rank} (local rank {local_rank} on node {node_rank}) {how}; the job's other ranks were"
        " stopped. Its traceback, if any, is in the output above."
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``notebook-fabric`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except ValueError as error:
        parser.exit(2, f"{PROG} run: error: {error}\n")
    return 2  # not reached; parser.exit raises SystemExit


if __name__ == "__main__":
    sys.exit(main())
