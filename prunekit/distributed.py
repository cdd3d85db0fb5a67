"""Several processes, one run: who is who, what each reads, and one decision for all.

    torchrun --nproc-per-node 2 -m prunekit prune model.pt --config configs/unet.yaml -o out/run

Every rank runs the same loop on the same model; only the data differs, each rank reading its
shard (:meth:`World.shard`). What must agree is made to:

- scoring statistics are summed over the ranks (:meth:`World.sum_over_ranks`, the ``reduce``
  option of a scorer), so IPAD and Taylor see every calibration batch exactly once; a scorer
  without ``reduce`` runs on rank 0 alone, on all the data, and its scores are broadcast;
- every rank plans from the same scores and :meth:`World.check_same` compares the plans: a
  difference is an error, never a silent divergence;
- fine-tuning runs in a new DistributedDataParallel after every cut (:meth:`World.training`);
- validation sums are summed over the ranks (:meth:`World.summed`); a validate function, a
  latency measurement and every read of the run directory happen on rank 0 and are broadcast
  (:meth:`World.from_main`); only rank 0 writes.

A single process is a :class:`World` of size 1, in which every helper does nothing:

    with joined("auto") as world:      # torchrun's environment, an initialised group, or one process
        world.rank, world.size, world.main
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import os
import pickle
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import PrunekitError, UsageError

__all__ = ["World", "SINGLE", "current", "joined", "launched_rank", "DistributedError", "takes_reduce"]


class DistributedError(PrunekitError):
    """The ranks of a run disagree, or one of them stopped; ``rank`` names the one that differs or stopped."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def _dist():
    import torch.distributed as dist

    return dist


def _initialised() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def launched_rank() -> int:
    """This process's rank: from the process group, else from torchrun's ``RANK`` (0 when not launched so)."""
    if _initialised():
        return _dist().get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class World:
    """The processes of one run: this one's ``rank`` among ``size``, and ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    # -- where this rank computes ---------------------------------------------------------

    def device(self, device: torch.device) -> torch.device:
        """``cuda`` (from ``device: auto`` or ``cuda``) is this rank's GPU, ``cuda:LOCAL_RANK``."""
        if not self.many or device.type != "cuda":
            return device
        if device.index is not None:
            raise UsageError(f"device '{device}' names one GPU, but {self.size} ranks run this prune; use device: "
                             "auto or cuda (each rank takes cuda:LOCAL_RANK).")
        return torch.device("cuda", self.local_rank)

    def shard(self, batches):
        """This rank's share of ``batches`` (a :class:`~prunekit.data.batches.Batches`, a list, or None)."""
        if not self.many or batches is None:
            return batches
        if isinstance(batches, (list, tuple)):
            return list(batches[self.rank::self.size])
        return batches.shard(self.rank, self.size)

    # -- agreeing ---------------------------------------------------------------------------

    def _object_device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None

    @contextlib.contextmanager
    def _peers(self, what: str):
        """A collective whose failure means another rank stopped: one sentence, not a backend traceback."""
        try:
            yield
        except PrunekitError:
            raise
        except RuntimeError as exc:
            if not _lost_peer(exc):
                raise
            raise DistributedError(f"rank {self.rank} lost the other ranks while {what} (another rank stopped; "
                                   f"its own output says why).", self.rank) from exc

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (picklable values)."""
        if not self.many:
            return [value]
        out: list = [None] * self.size
        with self._peers("gathering"):
            _dist().all_gather_object(out, value)
        return out

    def from_main(self, fn: Callable, *args):
        """``fn(*args)`` computed on rank 0 and broadcast to every rank; what it raises is raised on every rank
        (on the others as a DistributedError that quotes it)."""
        if not self.many:
            return fn(*args)
        box: list = [None]
        error = None
        if self.main:
            try:
                box[0] = ("value", fn(*args))
            except Exception as exc:  # noqa: BLE001 - raised here as it is, and on the other ranks as one sentence
                error, box[0] = exc, ("error", str(exc) if isinstance(exc, PrunekitError) else
                                      f"{type(exc).__name__}: {exc}")
        with self._peers("waiting for rank 0"):
            _dist().broadcast_object_list(box, src=0, device=self._object_device())
        kind, value = box[0]
        if kind == "error":
            if error is not None:
                raise error
            raise DistributedError(f"rank 0 stopped: {value}", 0)
        return value

    def barrier(self) -> None:
        self.from_main(lambda: None)

    def check_same(self, what: str, value) -> None:
        """Every rank holds the same ``value`` (hashed), or a DistributedError naming the first rank that differs."""
        if not self.many:
            return
        digest = hashlib.sha256(pickle.dumps(value, protocol=4)).hexdigest()
        digests = self.gather(digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise DistributedError(f"the ranks disagree on {what}: rank {odd[0]} differs from rank 0; every rank "
                                   "must load the same model, config and code.", odd[0])

    # -- summing ----------------------------------------------------------------------------

    def sum_over_ranks(self, sums: dict, counts: dict) -> tuple[dict, dict]:
        """A scorer's running sums and counts (by producer) summed over the ranks; a rank whose shard was
        empty contributes zeros. The ``reduce`` option of the scorers in ``prunekit.importance``."""
        if not self.many:
            return sums, counts
        shapes = self.gather({n: (tuple(t.shape), t.dtype) for n, t in sums.items()})
        known: dict = {}
        for rank, entries in enumerate(shapes):
            for name, shape in entries.items():
                if known.setdefault(name, shape) != shape:
                    raise DistributedError(f"the ranks disagree on the shape of '{name}'s statistics: rank {rank} "
                                           f"has {shape[0]}, another {known[name][0]}.", rank)
        names = sorted(known)
        if not names:
            return sums, counts
        home = next((t.device for t in sums.values()), None)  # None: this rank's shard was empty
        device = torch.device("cpu") if self.backend == "gloo" else home or self._object_device() or \
            torch.device("cpu")
        home = home or device
        dtype = torch.float64
        flat = torch.cat([sums[n].detach().to(device, dtype).reshape(-1) if n in sums else
                          torch.zeros(int(torch.Size(known[n][0]).numel()), dtype=dtype, device=device) for n in names]
                         + [torch.tensor([float(counts.get(n, 0)) for n in names], dtype=dtype, device=device)])
        with self._peers("summing the calibration statistics"):
            _dist().all_reduce(flat)
        out_sums, offset = {}, 0
        for n in names:
            size = int(torch.Size(known[n][0]).numel())
            out_sums[n] = flat[offset:offset + size].reshape(known[n][0]).to(home, known[n][1])
            offset += size
        out_counts = {n: int(round(float(c))) for n, c in zip(names, flat[offset:].tolist())}
        return out_sums, out_counts

    def summed(self, stats: dict) -> dict:
        """Numbers and tensors of ``stats`` summed over the ranks (None counts as nothing), e.g. a metric's counts."""
        if not self.many:
            return stats
        local = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
        total: dict = {}
        for entry in self.gather(local):
            for key, value in entry.items():
                if value is None:
                    total.setdefault(key, None)
                elif total.get(key) is None:
                    total[key] = value
                else:
                    total[key] = total[key] + value
        return total

    def scores(self, scorer: Callable, score: Callable[[bool], object]):
        """``score(sharded)``: a scorer that takes ``reduce`` runs on every rank on its shard; any other runs on
        rank 0 on all the data, and its result is broadcast."""
        if not self.many:
            return score(False)
        if takes_reduce(scorer):
            return score(True)
        return self.from_main(score, False)

    # -- training ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def training(self, model: nn.Module):
        """``model`` in a new DistributedDataParallel for the block (the parameters change with every cut);
        afterwards every rank holds rank 0's parameters and buffers (BatchNorm statistics are per rank)."""
        if not self.many:
            yield model
            return
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        with self._peers("starting fine-tuning"):
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                          static_graph=True)
        with self._peers("fine-tuning"):
            yield net
        self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if not self.many:
            return
        dist = _dist()
        with self._peers("synchronising the model"), torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if self.backend == "gloo" and tensor.device.type != "cpu":
                    staged = tensor.detach().cpu()
                    dist.broadcast(staged, src=0)
                    tensor.copy_(staged)
                else:
                    dist.broadcast(tensor.data, src=0)


SINGLE = World()

# what the backends' errors say when another rank is gone (gloo raises a plain RuntimeError)
_PEER_ERRORS = ("Connection reset", "Connection closed", "gloo", "NCCL", "ProcessGroup", "Broken pipe")


def _lost_peer(exc: RuntimeError) -> bool:
    dist_error = getattr(_dist(), "DistError", ())
    return isinstance(exc, dist_error) or any(marker in str(exc) for marker in _PEER_ERRORS)


def takes_reduce(scorer: Callable) -> bool:
    """Whether a scorer names a ``reduce`` parameter (and so sums its statistics over the ranks itself)."""
    try:
        return "reduce" in inspect.signature(scorer).parameters
    except (TypeError, ValueError):
        return False


def current() -> World:
    """The world of the initialised default process group, or :data:`SINGLE`."""
    if not _initialised():
        return SINGLE
    dist = _dist()
    size = dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)
                               if torch.cuda.is_available() else 0))
    return World(dist.get_rank(), size, local, str(dist.get_backend()))


@contextlib.contextmanager
def joined(device: str = "auto"):
    """The run's :class:`World`: the process group already initialised (yours, left as it is), or the one
    torchrun's environment describes (``WORLD_SIZE`` > 1: NCCL when this rank computes on CUDA, else
    gloo; destroyed afterwards), or a single process."""
    if _initialised():
        yield current()
        return
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        size, local = 1, 0
    dist = _dist()
    if size <= 1 or not dist.is_available():
        yield SINGLE
        return
    cuda = str(device) != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        with _terminate_as_interrupt():
            yield current()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _terminate_as_interrupt():
    """torchrun stops the other ranks with SIGTERM when one ends: take it as Ctrl-C (once), so rank 0 leaves
    its run directory resumable instead of dying mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt("interrupted: another rank stopped (SIGTERM).")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def batch_count(total: int | None, rank: int, size: int) -> int | None:
    """How many of ``total`` batches rank ``rank`` of ``size`` reads when they are dealt out in turn."""
    return None if total is None else len(range(rank, total, size))


def dealt(batches: Iterable, rank: int, size: int):
    """Batches ``rank``, ``rank + size``, ... of ``batches``: an iterable's share, read in turn."""
    return itertools.islice(iter(batches), rank, None, size)
