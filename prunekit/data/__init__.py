"""What prunekit feeds the model: batches from the user's data (``batches``), image folders read lazily
(``folders``, pixels by ``images``), the bundled datasets (``datasets``) and the short training and
evaluation loops (``trainer``)."""

from .batches import Batches, check_batch, data_paths, first_input, load_batches, random_batches, tensor_batches
from .folders import FolderDataset, folder_dataset
from .images import DataError

__all__ = ["Batches", "DataError", "FolderDataset", "check_batch", "data_paths", "first_input", "folder_dataset",
           "load_batches", "random_batches", "tensor_batches"]
