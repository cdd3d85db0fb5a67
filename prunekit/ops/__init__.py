"""Everything prunekit knows about ops: one table of :class:`OpSpec` records and their small functions.

- :mod:`.op`: what a channel rule sees, and the rules every part of the table shares
- :mod:`.channels`, :mod:`.shapes`: channel rules of ops without weights
- :mod:`.layers`: layers with weights (rules, resizing, which tensors carry a channel)
- :mod:`.flops`: FLOPs handles in fvcore's convention
- :mod:`.table`: the table itself, and ``register`` to add an op
"""

from .table import OpSpec, is_leaf_type, layer_spec, module_spec, register, spec_for, spec_for_target, \
    width_attributes

__all__ = ["OpSpec", "is_leaf_type", "layer_spec", "module_spec", "register", "spec_for", "spec_for_target",
           "width_attributes"]
