"""``python -m notebook_fabric run ...``: the same as the ``notebook-fabric`` command."""
import sys

from notebook_fabric.cli import main

if __name__ == "__main__":
    sys.exit(main())
