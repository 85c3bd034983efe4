"""launch(fn) in a terminal: rank 1 stops at breakpoint(); the script's own terminal answers.

Usage: python stepping_terminal.py START_METHOD [post-mortem]
"""
import sys

import torch

from notebook_fabric import launch


def step(fabric):
    x = 40 + fabric.global_rank
    if fabric.global_rank == 1:
        breakpoint()
    total = fabric.all_reduce(torch.tensor([float(x)]), reduce_op="sum")
    return total.item()


def failing(fabric):
    scale = 7 + fabric.global_rank
    if fabric.global_rank == 1:
        raise ValueError("bad scale")
    return scale


if __name__ == "__main__":
    method = sys.argv[1]
    if sys.argv[2:] == ["post-mortem"]:
        launch(failing, accelerator="cpu", devices=2, start_method=method, post_mortem=True)
    else:
        # stall=1 and timeout=3: the time rank 1 spends in the debugger counts for neither (the timeout
        # also bounds the start, which a spawned interpreter may take longer than 3 s for)
        timeout = 3 if method == "fork" else 60
        print("RESULT", launch(step, accelerator="cpu", devices=2, start_method=method, stall=1, timeout=timeout))
