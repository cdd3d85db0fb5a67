"""Kept so that ``prunekit.io.load_model`` and friends still import: see :mod:`prunekit.loading`
(model files, builder specs, shapes) and :mod:`prunekit.files` (atomic writes)."""

from .files import atomic_dir, atomic_save_torch, atomic_write_bytes, atomic_write_text, atomic_writer, save_json, \
    strict_json  # noqa: F401
from .loading import *  # noqa: F401,F403
from .loading import CHECKPOINT_KEYS  # noqa: F401
