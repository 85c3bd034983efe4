"""The ``--ranks`` subset guard lives beside the tracer chain, in :mod:`notebook_fabric.collectives.subset_guard`."""
from notebook_fabric.collectives.subset_guard import SubsetCollectiveError, subset_guard, subset_message

__all__ = ["SubsetCollectiveError", "subset_guard", "subset_message"]
