"""Batches for calibration, fine-tuning and validation: from image folders (read lazily through a
DataLoader, see ``folders``), from a factory (any DataLoader or iterable of batches), or random
inputs when the config asks for them (``data.calibration: random``).

A batch is an input tensor, or a tuple/list whose first element is the input (and, for training
and validation, whose second is the target).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from ..config import Data, DataSource
from ..safety import call_user
from .folders import folder_dataset, source_paths
from .images import DataError


_END = object()


class Batches:
    """A re-iterable source of batches: every pass yields the same data in the same order.

    ``origin``: the user's data factory when the batches come from one; whatever reading its
    batches raises is then reported as that function's error. ``length``: the number of batches
    when known (for progress bars), before ``limit``. ``dataset``: the :class:`FolderDataset` of an
    image-folder source (None otherwise).
    """

    dataset = None
    _shard = None  # (rank, size) -> Batches: a source that reads only its share (an image folder)

    def __init__(self, make: Callable[[], Iterable], limit: int | None = None, origin: str | None = None,
                 length: int | None = None):
        self._make = make
        self.limit = limit
        self.origin = origin
        self.length = length if limit is None or length is None else min(length, limit)

    def __iter__(self) -> Iterator:
        if self.origin is None:
            for i, batch in enumerate(self._make()):
                if self.limit is not None and i >= self.limit:
                    return
                yield batch
            return
        items = call_user(lambda: iter(self._make()), "data factory", self.origin)
        i = 0
        while self.limit is None or i < self.limit:
            batch = call_user(next, "data factory", self.origin, items, _END)
            if batch is _END:
                return
            yield batch
            i += 1

    def map(self, fn: Callable) -> "Batches":
        """These batches with ``fn`` applied to each, lazily, on every pass."""
        return Batches(lambda: (fn(b) for b in self), length=self.length)

    def shard(self, rank: int, size: int) -> "Batches":
        """Rank ``rank``'s share when ``size`` processes read these batches together (``prunekit.distributed``).

        An image folder's ranks read every ``size``-th image from ``rank`` on (within ``limit`` batches), so
        batch i of every rank together is batch i of a single process with ``size`` times the batch size;
        a factory's batches are dealt out in turn (batch ``rank``, ``rank + size``, ...), and a DataLoader
        with its own DistributedSampler is taken as it is. No batch is read twice or left out.
        """
        from ..distributed import batch_count, dealt

        if size <= 1:
            return self
        if self._shard is not None:
            return self._shard(rank, size)
        return Batches(lambda: dealt(self, rank, size), length=batch_count(self.length, rank, size))

    def inputs(self) -> Iterator[torch.Tensor]:
        for batch in self:
            yield first_input(batch)


def first_input(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image", batch.get("input")), torch.Tensor):
        return batch.get("image", batch.get("input"))
    raise DataError("a batch must be a tensor or a tuple/list whose first element is the input tensor.")


def tensor_batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> Callable[[], Iterable]:
    def make():
        for start in range(0, len(x), batch_size):
            stop = start + batch_size
            yield x[start:stop] if y is None else (x[start:stop], y[start:stop])

    return make


def random_batches(example_inputs, seed: int) -> Batches:
    """``data.calibration: random``: one batch of uniform noise shaped like each example input (float
    tensors inside tuples and dicts too), the same on every pass (seeded with the config's seed)."""
    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:  # integer inputs (ids, sizes) are kept as they are
        return torch.rand(t.shape, generator=generator, dtype=t.dtype) if t.is_floating_point() else t

    batches = [torch.utils._pytree.tree_map_only(torch.Tensor, noise, t) for t in example_inputs]
    return Batches(lambda: iter(batches), length=len(batches))


def data_paths(data: Data) -> list:
    """Every folder and file the config's data sources read, resolved."""
    return [path for src in (data.calibration, data.train, data.val) if isinstance(src, DataSource)
            for path in source_paths(src, data.root)]


def _loaded(loader) -> Iterator:
    """A DataLoader's batches; a DataError raised in a worker process keeps its one sentence."""
    try:
        yield from loader
    except DataError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) > 1 and "Traceback" in str(exc):  # a worker's error carries its traceback: keep the sentence
            raise DataError(lines[-1].split(": ", 1)[-1], exc.key, exc.path) from None
        raise


def load_batches(source: DataSource | None, input_shape, what: str, root: str | None = None) -> Batches | None:
    """The batches a config's data source describes (None when not configured), checked: folders listed,
    files paired and their headers read, and the first batch fits the model's input.

    ``root``: where relative paths start (``data.root``; None: the current directory).
    """
    if source is None:
        return None
    if source.factory:
        from ..builders import resolve_callable

        factory = resolve_callable(source.factory)
        role = "data factory"
        produced = call_user(factory, role, source.factory, **source.kwargs)
        if produced is None or isinstance(produced, (str, bytes)) or not hasattr(produced, "__iter__"):
            from ..errors import UserFunctionError

            problem = f"returned {type(produced).__name__}, not a DataLoader or an iterable of batches"
            raise UserFunctionError(f"your {role} {source.factory!r} (data.{what}.factory) {problem}.",
                                    source.factory, role, problem)
        if call_user(iter, role, source.factory, produced) is produced:  # one-shot: keep it for every pass
            produced = call_user(list, role, source.factory, produced)
        length = len(produced) if hasattr(produced, "__len__") else None
        batches = Batches(lambda: produced, source.limit, origin=source.factory, length=length)
        if _sharded_by_user(produced):
            batches._shard = lambda rank, size: batches
    elif source.images:
        dataset = folder_dataset(source, input_shape, what, root)
        loader = torch.utils.data.DataLoader(dataset, batch_size=source.batch_size, shuffle=False,
                                             num_workers=source.workers)
        batches = Batches(lambda: _loaded(loader), source.limit, length=len(loader))
        batches.dataset = dataset
        batches._shard = lambda rank, size: _folder_shard(dataset, source, rank, size)
    else:
        raise DataError(f"data.{what} needs 'images' (a folder) or 'factory'.", key=f"data.{what}")
    first = next(iter(batches), None)
    if first is None:
        raise DataError(f"data.{what} yields no batches.", key=f"data.{what}")
    check_batch(first, input_shape, what)
    return batches


def _sharded_by_user(produced) -> bool:
    """A DataLoader whose sampler already gives each rank its share (torch's DistributedSampler)."""
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(produced, torch.utils.data.DataLoader):
        return False
    sampler = getattr(produced.batch_sampler, "sampler", None) or produced.sampler
    return isinstance(sampler, DistributedSampler)


def _folder_shard(dataset, source: DataSource, rank: int, size: int) -> Batches:
    """Images ``rank``, ``rank + size``, ... of the first ``limit`` batches' images, in batches of ``batch_size``."""
    total = len(dataset) if source.limit is None else min(len(dataset), source.limit * source.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=source.batch_size, sampler=range(rank, total, size),
                                         num_workers=source.workers)
    shard = Batches(lambda: _loaded(loader), length=len(loader))
    shard.dataset = dataset
    return shard


def check_batch(batch, input_shape, what: str) -> None:
    """The first batch of a data source fits the model's input: a float tensor with the input's number of
    dimensions and channels, and (when it has targets) labels that are not negative."""
    try:
        x = first_input(batch)
    except DataError:
        raise DataError(f"data.{what}: a batch must be a tensor or a tuple/list whose first element is the input "
                        f"tensor, got {type(batch).__name__}.") from None
    if not x.is_floating_point():
        raise DataError(f"data.{what}: the first batch's input is a {x.dtype} tensor; the model needs floats.")
    if input_shape is not None:
        if x.dim() != len(input_shape):
            raise DataError(f"data.{what}: the first batch's input has shape {tuple(x.shape)}, but the model's "
                            f"input_shape {list(input_shape)} has {len(input_shape)} dimensions.")
        if x.shape[1] != input_shape[1]:
            raise DataError(f"data.{what}: the first batch's input has {x.shape[1]} channels (shape "
                            f"{tuple(x.shape)}), but the model takes {input_shape[1]}.")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"data.{what}: the first batch's input holds NaN or infinite values.")
    target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if what in ("train", "val") and target is None:
        raise DataError(f"data.{what}: batches must be (input, target) pairs for fine-tuning and validation, but "
                        f"the first batch is {_kind(batch)}.", key=f"data.{what}")
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.numel():
        if int(target.min()) < 0:
            raise DataError(f"data.{what}: the first batch has the negative label {int(target.min())}; class "
                            "labels are 0, 1, ...")


def _kind(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"one tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"
