"""Unstructured sparsity for the weights that structured pruning keeps.

    from prunekit.config import Sparsity
    from prunekit.sparse import sparsify
    result = sparsify(model, train_batches, Sparsity(density=0.1, backward_density=0.2))
    result.model       # exact zeros outside the top 10% of each conv / Linear weight
    result.report      # density per tensor and overall, nonzeros, dense vs CSR / bitmask bytes

- :class:`TopKAST`: Top-KAST as a reparametrisation (``torch.nn.utils.parametrize``) of the user's
  own layers; ``method="magnitude"`` is one-shot magnitude pruning with fixed masks.
- The trainer's sparse mode: ``prunekit.data.trainer.finetune(..., sparsity=Sparsity(...))``.
- :func:`remove_dead_filters`: filters that ended all zero, cut exactly through the channel graph.

Compute stays dense: see :data:`COMPUTE_NOTE`.
"""

from .dead import DeadFilters, dead_filters, remove_dead_filters, zero_filters
from .masks import SPARSE_LAYERS, SparseTensor, keep_count, masks_for, select_tensors, top_mask
from .report import BACKWARD_NOTE, COMPUTE_NOTE, render_sparsity_markdown, sparsity_report
from .topkast import MaskedWeight, TopKAST
from .training import SparseResult, exploration_steps, sparse_tensors, sparsify, start_sparse

__all__ = ["BACKWARD_NOTE", "COMPUTE_NOTE", "DeadFilters", "MaskedWeight", "SPARSE_LAYERS", "SparseResult",
           "SparseTensor", "TopKAST", "dead_filters", "exploration_steps", "keep_count", "masks_for",
           "remove_dead_filters", "render_sparsity_markdown", "select_tensors", "sparse_tensors", "sparsify",
           "sparsity_report", "start_sparse", "top_mask", "zero_filters"]
