"""One rank of the distributed tests (tests/test_distributed.py starts two, as torchrun would).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/_distributed_worker.py SCENARIO OUT_DIR

Writes what the rank computed to OUT_DIR/rank<R>.pt. Also the data factories, builders and
functions the tests' configs name as ``_distributed_worker:...``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

import prunekit
from prunekit.zoo import unet

SIZE = 16


def seg_data(n: int = 8, batch: int = 2, seed: int = 0):
    """``n`` batches of ``batch`` 1x16x16 images with 2-class masks, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n * batch, 1, SIZE, SIZE, generator=g)
    y = (x > 0.6).long()[:, 0]
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def cls_data(n: int = 8, batch: int = 2, seed: int = 1):
    """``n`` batches of ``batch`` 1x16x16 images with labels 0..2 that depend on the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n * batch, 1, SIZE, SIZE, generator=g)
    y = (x.mean((1, 2, 3)) * 30).long() % 3
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


class PlainCNN(nn.Module):
    """Convolutions without BatchNorm: DDP fine-tuning on 2 ranks equals one process with twice the batch."""

    def __init__(self, width: int = 8, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(nn.functional.max_pool2d(x, 2)))
        return self.fc(self.pool(x).flatten(1))


def plain_cnn(width: int = 8) -> PlainCNN:
    torch.manual_seed(3)
    return PlainCNN(width)


def small_unet() -> nn.Module:
    torch.manual_seed(2)
    return unet(in_channels=1, num_classes=2, width=4, depth=2).eval()


CALLS = {"n": 0}


def stop_on_second(model, batches, iterations):
    """A fine-tune function that does nothing, except Ctrl-C on its second call when PRUNEKIT_TEST_STOP is set."""
    CALLS["n"] += 1
    if os.environ.get("PRUNEKIT_TEST_STOP") and CALLS["n"] >= 2:
        raise KeyboardInterrupt


def mean_output(model, graph, batches):
    """A custom scorer without ``reduce``: mean |output| of each producer over the batches (runs on rank 0)."""
    totals = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: totals.__setitem__(n, totals.get(n, 0) + o.detach().abs().mean((0, 2, 3))))
        for n in graph.producers if isinstance(model.get_submodule(n), nn.Conv2d)]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return totals


def rank_metric(model):
    """A validate function that tells which rank ran it: 1.0 on rank 0."""
    return float(os.environ.get("RANK", "0") == "0")


def custom_config() -> dict:
    return seg_config(importance={"method": "_distributed_worker:mean_output"},
                      validate="_distributed_worker:rank_metric")


def slow_tune(model, batches, iterations):
    """A fine-tune function that does nothing, slowly (20 s) when PRUNEKIT_TEST_SLOW is set."""
    import time

    if os.environ.get("PRUNEKIT_TEST_SLOW"):
        time.sleep(20)


def seg_config(**extra) -> dict:
    config = {
        "targets": {"flops": 0.5}, "schedule": {"steps": 2}, "importance": {"method": "ipad"},
        "data": {"calibration": {"factory": "_distributed_worker:seg_data", "kwargs": {"n": 6, "batch": 2}},
                 "val": {"factory": "_distributed_worker:seg_data", "kwargs": {"n": 4, "batch": 2, "seed": 5}}},
        "device": "cpu", "seed": 0,
    }
    config.update(extra)
    return config


def tune_config(train_batch: int = 2) -> dict:
    """Taylor scores and fine-tuning on cls_data's 16 images in batches of ``train_batch``: two ranks dealt
    batches of 2 train together on what one process trains on in batches of 4."""
    return {
        "targets": {"flops": 0.6}, "schedule": {"steps": 2, "finetune": {"iterations": 3, "lr": 0.01},
                                                "final_finetune": {"iterations": 2, "lr": 0.01}},
        "importance": {"method": "taylor"},
        "data": {"train": {"factory": "_distributed_worker:cls_data",
                           "kwargs": {"n": 16 // train_batch, "batch": train_batch}},
                 "calibration": {"factory": "_distributed_worker:cls_data", "kwargs": {"n": 4, "seed": 4}},
                 "val": {"factory": "_distributed_worker:cls_data", "kwargs": {"n": 4, "seed": 6}}},
        "device": "cpu", "seed": 0,
    }


def summary(result) -> dict:
    return {"state": {k: v.clone() for k, v in result.model.state_dict().items()},
            "history": [(h.step, h.flops, h.params, h.removed_units, h.metric) for h in result.history],
            "modules": result.manifest["modules"], "best_step": result.best_step,
            "final": result.final, "targets_met": result.targets_met}


def scenario_scores(rank: int, out: Path) -> dict:
    """The Python API under a process group the caller initialised: scores, then a whole prune into a run dir."""
    import torch.distributed as dist

    from prunekit.data.batches import Batches
    from prunekit.distributed import current
    from prunekit.importance import ipad, score_units

    dist.init_process_group("gloo")
    try:
        world = current()
        model, example = small_unet(), torch.rand(1, 1, SIZE, SIZE)
        graph = prunekit.build_graph(model, example)
        data = [x for x, _ in seg_data(n=6)]
        batches = Batches(lambda: iter(data), length=len(data))
        raw = ipad(model, graph, world.shard(batches), reduce=world.sum_over_ranks)
        lone = ipad(model, graph, world.shard(data[:1]), reduce=world.sum_over_ranks)  # rank 1 reads nothing
        units = world.scores(ipad, lambda sharded: score_units(
            model, graph, "ipad", world.shard(batches) if sharded else batches,
            {"reduce": world.sum_over_ranks} if sharded else {}))
        result = prunekit.prune(model, example, seg_config(), run_dir=out / "run", progress=False)
        custom = prunekit.prune(model, example, custom_config(), progress=False)
        return {"custom": summary(custom), "raw": {k: v.clone() for k, v in raw.items()}, "lone": lone, "units": units, **summary(result),
                "still_initialised": dist.is_initialized()}
    finally:
        dist.destroy_process_group()


def scenario_tune(rank: int, out: Path) -> dict:
    """As torchrun: the process group comes from the environment; DDP fine-tuning between cuts."""
    result = prunekit.prune(plain_cnn(), torch.rand(1, 1, SIZE, SIZE), tune_config(train_batch=2), progress=False)
    return summary(result)


def scenario_stop(rank: int, out: Path) -> dict:
    """A run Ctrl-C'd on every rank in its second step's fine-tuning."""
    os.environ["PRUNEKIT_TEST_STOP"] = "1"
    try:
        prunekit.prune(small_unet(), torch.rand(1, 1, SIZE, SIZE), stop_config(), run_dir=out / "run",
                       progress=False)
    except KeyboardInterrupt as exc:
        return {"interrupted": type(exc).__name__, "resumable": getattr(exc, "resumable", None)}
    return {"interrupted": None}


def scenario_resume(rank: int, out: Path) -> dict:
    result = prunekit.prune(small_unet(), torch.rand(1, 1, SIZE, SIZE), stop_config(), run_dir=out / "run",
                            resume=True, progress=False)
    return summary(result)


def scenario_latency(rank: int, out: Path) -> dict:
    """A latency target: rank 0 measures the tables and every step's latency, every rank plans with them."""
    config = seg_config(targets={"latency": 0.8, "flops": 1.0}, importance={"method": "l1"},
                        latency={"threads": 1, "repeats": 3, "warmup": 1})
    result = prunekit.prune(small_unet(), torch.rand(1, 1, SIZE, SIZE), config, progress=False)
    return {**summary(result), "latency": [h.latency_ratio for h in result.history]}


def scenario_disagree(rank: int, out: Path) -> dict:
    model = small_unet()
    if rank == 1:
        with torch.no_grad():
            next(model.parameters())[0].add_(1.0)
    try:
        prunekit.prune(model, torch.rand(1, 1, SIZE, SIZE), seg_config(), progress=False)
    except prunekit.PrunekitError as exc:
        return {"error": str(exc)}
    return {"error": None}


def stop_config() -> dict:
    return seg_config(schedule={"steps": 3, "finetune": {"iterations": 1, "function": "_distributed_worker:stop_on_second"}})


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    try:
        payload = globals()[f"scenario_{scenario}"](rank, out)
    except BaseException:  # noqa: BLE001 - the test shows what failed on which rank
        payload = {"crash": traceback.format_exc()}
    torch.save(payload, out / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
