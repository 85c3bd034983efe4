"""The IPython face of the magics: argument parsing and registration. The work is in :mod:`.session`."""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from notebook_fabric.strategies.start_methods import POOL_START_METHODS

from .commands import FabricUsageError
from .session import CellOptions, FabricSession


@dataclass(frozen=True)
class LineCommand:
    """One ``%fabric`` sub-command: its synopsis and help (the usage text), its arguments
    (``argparse`` ``(name, options)`` pairs) and what it does with the session and the parsed arguments."""

    synopsis: str
    help: str
    arguments: Tuple[Tuple[str, Dict[str, Any]], ...] = ()
    run: Callable[[FabricSession, argparse.Namespace], Optional[str]] = lambda session, args: None

    @property
    def name(self) -> str:
        return self.synopsis.split()[1]


#: every ``%fabric`` sub-command: the usage text, the dispatch and the parsers are read from here
LINE_COMMANDS: Tuple[LineCommand, ...] = (
    LineCommand("%fabric status", "ranks, pids, state, device, memory", run=lambda session, args: session.status()),
    LineCommand("%fabric where", "every rank's current Python stack (works while a cell is stuck,\n"
                "from a kernel subshell), then where ranks were at the last\ninterrupt or stall report",
                run=lambda session, args: session.where()),
    LineCommand("%fabric ledger [--last N]", "every rank's collectives (Fabric's and torch's own, e.g. DDP's) side\n"
                "by side by sequence number, the first divergence marked",
                (("--last", {"type": int, "default": None}),), lambda session, args: session.ledger(args.last)),
    LineCommand("%fabric stop", "end the pool", run=lambda session, args: session.stop()),
    LineCommand("%fabric restart", "end the pool and start it again with the same settings",
                run=lambda session, args: session.restart()),
    LineCommand("%fabric pull NAME [--rank R | --all]", "copy a rank's variable (default rank 0; --all: list by rank)",
                (("name", {}), ("--rank", {"type": int, "default": None}), ("--all", {"action": "store_true"})),
                lambda session, args: session.pull(args.name, args.rank, args.all)),
    LineCommand("%fabric push NAME [NAME ...] [--rank R]", "send notebook variables to the ranks (default every rank)",
                (("names", {"nargs": "+"}), ("--rank", {"type": int, "action": "append"})),
                lambda session, args: session.push(args.names, args.rank)),
    LineCommand("%fabric debug [--rank R]", "pdb on the frame where the last failing cell failed (default: the\n"
                "first failing rank), with its locals; the pool stays",
                (("--rank", {"type": int, "default": None}),), lambda session, args: session.debug(args.rank)),
)
_HELP_COLUMN = 37


def _usage(commands: Sequence[LineCommand]) -> str:
    lines: List[str] = []
    for command in commands:
        helps = command.help.split("\n")
        if len(command.synopsis) < _HELP_COLUMN:
            lines.append(command.synopsis.ljust(_HELP_COLUMN) + helps[0])
            helps = helps[1:]
        else:
            lines.append(command.synopsis)
        lines += [" " * _HELP_COLUMN + text for text in helps]
    return "\n".join(lines)


LINE_USAGE = _usage(LINE_COMMANDS)


@magics_class
class FabricMagics(Magics):
    """``%%fabric`` runs a cell on every rank of a persistent pool; ``%fabric`` manages the pool."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.session = FabricSession(shell.user_ns)

    @line_cell_magic
    @magic_arguments("%fabric")  # shown as %%fabric in the usage line
    @argument("--devices", "-n", type=int, default=None, metavar="N",
              help="number of ranks (default 2, or the running pool's)")
    @argument("--accelerator", default=None, help="cpu, cuda, gpu, mps, tpu or auto (default auto)")
    @argument("--strategy", default=None, help="the Fabric strategy (default ddp)")
    @argument("--precision", default=None, help="e.g. 32-true, bf16-mixed, 16-mixed")
    @argument("--start-method", dest="start_method", default=None, choices=list(POOL_START_METHODS),
              help="how ranks start (default: fork where safe, else spawn)")
    @argument("--num-nodes", dest="num_nodes", type=int, default=None, metavar="N",
              help="hosts, each running --devices ranks (needs --cluster; default 1)")
    @argument("--cluster", default=None, choices=["local", "slurm"],
              help="where the ranks run: this machine (local, default) or hosts that Slurm allocates")
    @argument("--partition", default=None, help="the Slurm partition (with --cluster slurm)")
    @argument("--log-dir", dest="log_dir", default=None, metavar="DIR",
              help="also write every rank's complete stdout/stderr to DIR/rank<N>/stdout.log, stderr.log "
                   "(default: a temporary folder, kept if a cell fails)")
    @argument("--debug", dest="debug", action="store_true", default=None,
              help="Fabric debug mode: ranks compare collective signatures before each collective")
    @argument("--no-debug", dest="debug", action="store_false", help="switch debug mode off again")
    @argument("--ranks", default=None, metavar="0,2",
              help="run the cell on these ranks only (collectives in such a cell are refused, not hung)")
    @argument("--timeout", type=float, default=None, metavar="S",
              help="give up after S seconds: report which ranks wait in which collective and where the rest are")
    @argument("--stall", type=float, default=10.0, metavar="S",
              help="report every rank's stack when some ranks have waited S seconds in a collective that others "
                   "have not entered (default 10; 0: off)")
    @argument("--show", default=None, metavar="all|R",
              help="whose output to show: 'all', or ranks like 1 or 0,2 (default rank 0; with --ranks, those ranks)")
    @argument("--dashboard", dest="dashboard", action="store_true", default=None,
              help="show the live dashboard (every rank's state, memory, progress, output; default in a notebook)")
    @argument("--no-dashboard", dest="dashboard", action="store_false",
              help="print rank output as text instead of the live dashboard")
    @argument("--out", action="append", default=[], metavar="NAME",
              help="after the cell, set NAME in the notebook to its value on rank 0 (the first rank that ran)")
    @argument("--out-all", dest="out_all", action="append", default=[], metavar="NAME",
              help="after the cell, set NAME in the notebook to a list of every running rank's value, by rank")
    def fabric(self, line: str, cell: Optional[str] = None) -> Any:
        """Run the cell on every rank of a persistent pool of Fabric ranks; or manage the pool.

        In each rank ``fabric`` is that rank's launched Fabric; names a rank defines stay for the
        next cell. Notebook variables the cell reads are sent along. The value of the last
        expression is shown per rank. Options a cell leaves out keep the running pool's settings;
        a different setting restarts the pool.
        """
        if cell is None:
            return self._line(line)
        args = parse_argstring(self.fabric, line)
        options = CellOptions(
            settings={"devices": args.devices, "accelerator": args.accelerator, "strategy": args.strategy,
                      "precision": args.precision, "start_method": args.start_method, "debug": args.debug,
                      "log_dir": args.log_dir, "num_nodes": args.num_nodes,
                      "cluster": None if args.cluster == "local" else args.cluster, "partition": args.partition},
            ranks=args.ranks, timeout=args.timeout, stall=args.stall, show=args.show,
            outs=args.out, out_all=args.out_all, dashboard=args.dashboard,
        )
        try:
            return self.session.run_cell(cell, options, getattr(self.shell, "execution_count", None),
                                         header=f"%%fabric {line}".rstrip())
        except FabricUsageError as error:
            raise UsageError(str(error)) from None

    def _line(self, line: str) -> Any:
        words = shlex.split(line)
        name, rest = (words[0], words[1:]) if words else ("status", [])
        if name in ("help", "-h", "--help"):
            print(LINE_USAGE)
            return None
        command = _BY_NAME.get(name)
        if command is None:
            raise UsageError(f"unknown %fabric command {name!r}; use one of:\n{LINE_USAGE}")
        try:
            args = _parse(rest, name, command.arguments) if command.arguments else argparse.Namespace()
            print(command.run(self.session, args))
        except FabricUsageError as error:
            raise UsageError(str(error)) from None
        return None


_BY_NAME: Dict[str, LineCommand] = {command.name: command for command in LINE_COMMANDS}


def _parse(words: List[str], command: str, spec: Sequence[Any]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"%fabric {command}", add_help=False)
    for name, kwargs in spec:
        parser.add_argument(name, **kwargs)
    try:
        return parser.parse_args(words)
    except SystemExit:
        raise UsageError(f"usage: {parser.format_usage().strip()}") from None


FabricMagics.fabric.__doc__ = (FabricMagics.fabric.__doc__ or "") + "\nline form:\n" + LINE_USAGE


def register(shell: Any) -> FabricMagics:
    """Register the magics on ``shell`` (``%load_ext notebook_fabric``)."""
    magics = FabricMagics(shell)
    shell.register_magics(magics)
    shell._notebook_fabric_magics = magics
    return magics


def unregister(shell: Any) -> None:
    """Stop the pool and remove the magics (``%unload_ext notebook_fabric``)."""
    magics = getattr(shell, "_notebook_fabric_magics", None)
    if magics is None:
        return
    magics.session.shutdown()
    for kind in ("line", "cell"):
        shell.magics_manager.magics[kind].pop("fabric", None)
    del shell._notebook_fabric_magics
