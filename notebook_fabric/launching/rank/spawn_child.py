"""Entry point of a spawned rank: read the pickled bootstrap from stdin, then become the rank."""
from __future__ import annotations

import os
import pickle
import sys


def main() -> None:
    bootstrap = pickle.load(sys.stdin.buffer)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    from .main import rank_entry

    rank_entry(bootstrap, None)
