"""DeepSpeed checkpoint folders: where Fabric's entries live in them, and turning one into a single file."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import torch

from . import io as checkpoint_io

#: the tag of the checkpoint folder inside the directory given to ``fabric.save``
CHECKPOINT_TAG = "checkpoint"
#: the one key under which Fabric's own entries travel in DeepSpeed's client state
CLIENT_STATE_KEY = "notebook_fabric_client_state"


def consolidate_checkpoint(checkpoint_dir: Any, output_file: Any, tag: Optional[str] = None) -> Path:
    """Turn a DeepSpeed checkpoint folder written by ``fabric.save`` into one ordinary Fabric checkpoint file:
    ``{"model": <full fp32 state dict>, **<the other saved entries>}``, loadable with any strategy
    (``fabric.load(file, {"model": model})``) or plain ``torch.load``. Run it in one process (rank 0)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError("consolidate_checkpoint needs DeepSpeed: pip install 'notebook-fabric[deepspeed]'")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if tag is None:
        latest = checkpoint_dir / "latest"
        tag = latest.read_text().strip() if latest.is_file() else CHECKPOINT_TAG
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    model_files = sorted((checkpoint_dir / tag).glob("*mp_rank_00_model_states.pt"))
    extra: dict[str, Any] = {}
    if model_files:
        saved = torch.load(model_files[0], map_location="cpu", weights_only=False)
        extra = saved.get(CLIENT_STATE_KEY, {})
    return checkpoint_io.atomic_save({"model": dict(state_dict), **extra}, output_file)
