"""Pre-build the DeepSpeed ops that DeepSpeedStrategy needs, once, so the first training run does not.

DeepSpeed JIT-compiles its C++ ops the first time they are used and caches them under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). On CPU ranks the first
``deepspeed.initialize`` builds the shared-memory communication op (``deepspeed_shm_comm``, about
half a minute on two cores); CI calls this script once, before the tests, so no test pays for it
and two ranks never compile side by side::

    python scripts/build_deepspeed_ops.py            # the ops for this machine's DeepSpeed accelerator
    python scripts/build_deepspeed_ops.py --cpu-adam # also DeepSpeedCPUAdam (ZeRO-Offload's optimizer)

Keep ``TORCH_EXTENSIONS_DIR`` (or ``~/.cache/torch_extensions``) in the CI cache to skip even this.
Exits 0 with a note when DeepSpeed is not installed (it is an optional extra).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-adam", action="store_true", help="also build DeepSpeedCPUAdam (ZeRO-Offload)")
    parser.add_argument(
        "--accelerator",
        default=os.environ.get("DS_ACCELERATOR", "cpu"),
        help="DeepSpeed accelerator to build for (default: $DS_ACCELERATOR or 'cpu')",
    )
    options = parser.parse_args(argv)
    if importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed; nothing to build (pip install 'notebook-fabric[deepspeed]')")
        return 0
    os.environ["DS_ACCELERATOR"] = options.accelerator  # read once, when deepspeed picks its accelerator
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = ["ShareMemCommBuilder"] if accelerator.device_name() == "cpu" else []
    if options.cpu_adam:
        names.append("CPUAdamBuilder")
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"{name}: not available for DeepSpeed's {accelerator.device_name()} accelerator; skipped")
            continue
        start = time.perf_counter()
        builder.load(verbose=False)
        print(f"{builder.absolute_name()}: ready ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
