"""What prunekit feeds the model: batches from the user's data (``batches``), the bundled datasets
(``datasets``) and the short training and evaluation loops (``trainer``)."""

from .batches import Batches, DataError, check_batch, first_input, load_batches, tensor_batches

__all__ = ["Batches", "DataError", "check_batch", "first_input", "load_batches", "tensor_batches"]
