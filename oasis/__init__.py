"""OASIS: online activation subspace learning for memory-efficient training.

    from oasis import OasisConfig, prepare
    optimizer = prepare(model, OasisConfig(rank=32), lr=1e-4)
    # loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

from .linear import CompressedLinear
from .optim import OasisAdamW, adam_direction, all_reduce_sum, transport_moments
from .prepare import LLAMA_TARGETS, OasisConfig, compress, prepare
from .subspace import OjaTracker, SubspaceTracker, largest_principal_angle, orthonormalize

__all__ = ["OasisConfig", "prepare", "compress", "OasisAdamW", "CompressedLinear", "SubspaceTracker",
           "OjaTracker", "transport_moments", "adam_direction", "all_reduce_sum", "orthonormalize",
           "largest_principal_angle", "LLAMA_TARGETS"]
