"""Quality of pruning criteria and allocations: retention without fine-tuning, and after fine-tuning.

    python benchmarks/quality.py                           # retention curves, 3 seeds, fmnist, fmnist-nobn,
                                                           # fmnist-resnet, mni: about 2 hours on one thread
    python benchmarks/quality.py --finetune --tasks fmnist --methods none ipad l1 group_l2  # fine-tuned, 50% FLOPs
    python benchmarks/quality.py --tasks shapes --methods ipad l1 l1@sensitivity --json out/q.json

Tasks (each pretrained once per seed from that seed, so seeds vary pretraining as well as pruning):

- unet: the reference U-Net ``unet(in_channels=1, num_classes=2, width=16, depth=3)`` on the nuclei
  tiles (``prunekit.data.datasets.nuclei_tiles``, tile 64: 48 train tiles, 16 test tiles);
  metric: foreground IoU on the test tiles.
- shapes / shapes-nobn: ``prunekit.zoo.small_cnn()`` (with its BatchNorms, or with them replaced
  by identities) on :func:`shapes`, a synthetic 10-class task (a bar at one of 10 angles, random
  position and length, two distractor blobs, noise) that ships with this file; metric: accuracy.
- fmnist / fmnist-nobn: ``small_cnn`` (with or without its BatchNorms) on a Fashion-MNIST subset
  (``prunekit.data.datasets.fashion_mnist``: the first 6000 train images, the first 2000 test images).
- fmnist-resnet: ``prunekit.zoo.resnet_small(in_channels=1, width=8)``, a residual CNN of 13 3x3 convs
  (stem, 3 stages of 2 basic blocks, BN), on the same Fashion-MNIST subset.
- mni: the reference U-Net with 3 classes, grey / white matter on 2 mm axial slices of the MNI152
  template that ships in the nilearn wheel (:mod:`mni`: 72 train / 68 test slices of 96x112, in
  alternating blocks of 8 slices); metric: mean IoU of grey and white matter on the test slices.

A task whose data is not on this machine (Fashion-MNIST, nilearn) is skipped with a message.

Methods are ``criterion[@allocation]``: a criterion of :data:`CRITERIA` (l1, l2, bn_scale,
group_l2, fisher, random, and IPAD variants: ipad = raw output as published, ipad-bn / ipad-act
read after the BatchNorm / activation, ipad-w mixes the filter norm with omega 0.5 on comparable
scales, ipad-prop propagates importance with weight 0.5; ipad-w0.8 with omega 0.8, ipad-w0.8-l2 the
same with L2 norms, ipad-w-prop and ipad-act-w combine those options) and an allocation (uniform by
default, global or sensitivity). Also: none (no pruning) and tp-l2 (Torch-Pruning's group L2 pruner,
fine-tuned mode only, when installed).

Retention (default): ``prunekit.prune`` to 70, 50 and 35% of the FLOPs in 2 steps, no fine-tuning,
the test metric of the result. Fine-tuned (``--finetune``): 50% of the FLOPs in 4 steps with the
same fine-tune iterations after every step and at the end for every method. Paired differences
against ``--reference`` (default ipad) are the mean over seeds of (method - reference) with a 95%
Student t interval; a method is "better" or "worse" only when the interval excludes 0.
No validation data steers pruning; the FLOPs ratio is fvcore's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from common import dist_version, environment_line, load_average, prunekit, save_json, table, tp
from prunekit.costs import fvcore_counts
from prunekit.data import DataError
from prunekit.data.trainer import evaluate, finetune

RETENTION_TARGETS = (0.7, 0.5, 0.35)
RETENTION_STEPS = 2
FLOPS_TARGET, STEPS = 0.5, 4  # fine-tuned mode
FINAL_SEED_OFFSET = 1000  # prunekit seeds the final fine-tune with seed + best_step + 1000
TASKS = ["unet", "shapes", "shapes-nobn", "fmnist", "fmnist-nobn", "fmnist-resnet", "mni"]
CRITERIA = {
    "ipad": {"method": "ipad"},
    "ipad-bn": {"method": "ipad", "measure": "bn"},
    "ipad-act": {"method": "ipad", "measure": "act"},
    "ipad-w": {"method": "ipad", "omega": 0.5},
    "ipad-prop": {"method": "ipad", "propagate": 0.5},
    "ipad-act-prop": {"method": "ipad", "measure": "act", "propagate": 0.5},
    # candidates for the bar: a larger filter-norm share, its L2 form, and mixing with propagation
    "ipad-w0.8": {"method": "ipad", "omega": 0.8},
    "ipad-w0.8-l2": {"method": "ipad", "omega": 0.8, "norm": 2},
    "ipad-w-prop": {"method": "ipad", "omega": 0.5, "propagate": 0.5},
    "ipad-act-w": {"method": "ipad", "measure": "act", "omega": 0.5},
    **{m: {"method": m} for m in ("l1", "l2", "bn_scale", "group_l2", "fisher", "random")},
}
ALLOCATIONS = ("uniform", "global", "sensitivity")
DEFAULT_METHODS = ["ipad", "ipad-bn", "ipad-act", "ipad-w", "ipad-prop", "ipad-act-prop", "l1", "l2", "bn_scale",
                   "group_l2", "fisher", "random", "group_l2@global", "ipad@sensitivity", "ipad-act@sensitivity",
                   "l1@sensitivity", "l2@sensitivity", "bn_scale@sensitivity", "group_l2@sensitivity"]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}

BUDGETS = {
    "unet": {"pretrain": 300, "step_iterations": 10, "final_iterations": 40, "lr": 1e-3, "final_lr": 5e-4,
             "augment": True},
    # no flips for shapes: a flipped bar is another class
    "shapes": {"train": 4000, "test": 1000, "pretrain": 500, "step_iterations": 30, "final_iterations": 100,
               "lr": 2e-3, "final_lr": 5e-4, "augment": False},
    "fmnist": {"train": 6000, "test": 2000, "pretrain": 1000, "step_iterations": 50, "final_iterations": 150,
               "lr": 1e-3, "final_lr": 5e-4, "augment": True},
}
BUDGETS["shapes-nobn"] = BUDGETS["shapes"]
BUDGETS["fmnist-nobn"] = BUDGETS["fmnist"]
BUDGETS["fmnist-resnet"] = {**BUDGETS["fmnist"], "pretrain": 800}
BUDGETS["mni"] = {"pretrain": 600, "step_iterations": 10, "final_iterations": 40, "lr": 2e-3, "final_lr": 5e-4,
                  "augment": True}
UNET_KWARGS = {"in_channels": 1, "num_classes": 2, "width": 16, "depth": 3}
MNI_KWARGS = {"in_channels": 1, "num_classes": 3, "width": 8, "depth": 3}
RESNET_WIDTH = 8
UNET_TILE, UNET_BATCH, CNN_BATCH, CALIBRATION_IMAGES = 64, 8, 64, 256


def shapes(split: str = "train", n: int = 4000, batch_size: int = 64, seed: int = 0) -> list:
    """A synthetic 10-class image task: class k is a bar at angle k * 18 degrees, 28x28, with clutter.

    Random centre, length and brightness, two Gaussian blobs that carry no label, noise (std 0.2).
    Train and test draw from different generators; the same call always returns the same batches.
    """
    g = torch.Generator().manual_seed(seed * 2 + (split != "train"))
    y = torch.randint(0, 10, (n,), generator=g)
    theta = y.double() * math.pi / 10 + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.1
    centre = 9 + 10 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    half = 4 + 4 * torch.rand(n, generator=g, dtype=torch.float64)
    coords = torch.arange(28, dtype=torch.float64)
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    dy, dx = py[None] - centre[:, 0, None, None], px[None] - centre[:, 1, None, None]
    along = dx * theta.cos()[:, None, None] + dy * theta.sin()[:, None, None]
    across = -dx * theta.sin()[:, None, None] + dy * theta.cos()[:, None, None]
    bar = torch.exp(-across ** 2 / 2) * torch.sigmoid(2 * (half[:, None, None] - along.abs()))
    image = bar * (0.6 + 0.4 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64))
    for _ in range(2):
        c = 28 * torch.rand(n, 2, generator=g, dtype=torch.float64)
        image = image + 0.5 * torch.exp(-((py[None] - c[:, 0, None, None]) ** 2 + (px[None] - c[:, 1, None, None]) ** 2)
                                        / (2 * 2.0 ** 2))
    image = image + 0.2 * torch.randn(n, 28, 28, generator=g, dtype=torch.float64)
    x = image.float()[:, None]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def data_sources(task: str, budget: dict) -> dict:
    """The ``data`` section of the prunekit config: calibration and training batches (no validation)."""
    if task == "unet":
        train = {"factory": "prunekit.data.datasets:nuclei_tiles",
                 "kwargs": {"split": "train", "tile": UNET_TILE, "batch_size": UNET_BATCH}}
        return {"calibration": train, "train": train}
    if task == "mni":
        train = {"factory": "mni:slices", "kwargs": {"split": "train", "batch_size": UNET_BATCH}}
        return {"calibration": train, "train": train}
    if task.startswith("fmnist"):
        factory, kwargs = "prunekit.data.datasets:fashion_mnist", {"split": "train", "batch_size": CNN_BATCH}
        train = {"factory": factory, "kwargs": {**kwargs, "limit": budget["train"]}}
        return {"calibration": {"factory": factory, "kwargs": {**kwargs, "limit": CALIBRATION_IMAGES}},
                "train": train}
    train = {"factory": "quality:shapes", "kwargs": {"split": "train", "n": budget["train"], "batch_size": CNN_BATCH}}
    calibration = {"factory": "quality:shapes", "kwargs": {"split": "train", "n": CALIBRATION_IMAGES,
                                                          "batch_size": CNN_BATCH, "seed": 99}}
    return {"calibration": calibration, "train": train}


def importance_of(method: str) -> dict:
    """``criterion[@allocation]`` as the config's importance section."""
    criterion, _, allocation = method.partition("@")
    return {**CRITERIA[criterion], "allocation": allocation or "uniform"}


def prunekit_config(task: str, budget: dict, method: str, seed: int, flops: float, steps: int,
                    tuned: bool) -> dict:
    """The exact prunekit config of one run; only the importance section, the target and the seed vary."""
    tune = {"iterations": budget["step_iterations"] if tuned else 0, "lr": budget["lr"], "weight_decay": 0.0,
            "augment": budget["augment"]}
    final = {"iterations": budget["final_iterations"] if tuned else 0, "lr": budget["final_lr"],
             "weight_decay": 0.0, "augment": budget["augment"]}
    return {
        "targets": {"flops": flops, "params": 1.0, "stop_when": "both", "priority": "flops"},
        "importance": importance_of(method),
        "limits": {"default": 0.75, "layers": {last_layer(task): 0.0}, "round_to": 1},
        "schedule": {"steps": steps, "finetune": tune, "final_finetune": final},
        "data": data_sources(task, budget),
        "validate": None,
        "keep_best": 1,
        "seed": seed,
    }


def last_layer(task: str) -> str:
    return {"unet": "out", "mni": "out", "fmnist-resnet": "fc"}.get(task, "fc2")


def load_task(task: str, budget: dict, seed: int):
    """(fresh model initialised from ``seed``, example input, train batches, test batches)."""
    from prunekit import zoo
    from prunekit.data import datasets

    torch.manual_seed(seed)
    if task == "unet":
        model = zoo.unet(**UNET_KWARGS)
        train = datasets.nuclei_tiles("train", tile=UNET_TILE, batch_size=UNET_BATCH)
        test = datasets.nuclei_tiles("test", tile=UNET_TILE, batch_size=UNET_BATCH)
        return model, torch.zeros(1, 1, UNET_TILE, UNET_TILE), train, test
    if task == "mni":
        import mni

        train, test = mni.slices("train", UNET_BATCH), mni.slices("test", UNET_BATCH)
        return zoo.unet(**MNI_KWARGS), torch.zeros(1, 1, *mni.SIZE), train, test
    model = zoo.resnet_small(in_channels=1, width=RESNET_WIDTH) if task == "fmnist-resnet" else zoo.small_cnn()
    if task.endswith("-nobn"):
        for i, m in enumerate(model.features):
            if isinstance(m, nn.BatchNorm2d):
                model.features[i] = nn.Identity()
    if task.startswith("fmnist"):
        train = datasets.fashion_mnist("train", limit=budget["train"], batch_size=CNN_BATCH)
        test = datasets.fashion_mnist("test", limit=budget["test"], batch_size=500)
    else:
        train, test = shapes("train", budget["train"], CNN_BATCH), shapes("test", budget["test"], 500)
    return model, torch.zeros(1, 1, 28, 28), train, test


CACHE: Path | None = None  # --cache: pretrained weights kept here per (task, seed, budget)


def pretrained_model(task: str, budget: dict, seed: int):
    model, x, train, test = load_task(task, budget, seed)
    key = "-".join(str(budget[k]) for k in ("pretrain", "lr", "augment", "train") if k in budget)
    path = CACHE / f"{task}-seed{seed}-{key}.pt" if CACHE else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), x, train, test
    finetune(model, train, budget["pretrain"], lr=budget["lr"], seed=seed, use_augment=budget["augment"],
             show_progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), x, train, test


# -- the methods: each takes the pretrained model and returns a pruned (fine-tuned) one ----------------


def _finetune(model, train, budget, step, seed, final=False):
    iterations = budget["final_iterations" if final else "step_iterations"]
    finetune(model, train, iterations, lr=budget["final_lr" if final else "lr"], weight_decay=0.0, task="auto",
             use_augment=budget["augment"], seed=seed + step + (FINAL_SEED_OFFSET if final else 0), show_progress=False)


def run_none(task, budget, seed, pretrained, x, train, tuned):
    """No pruning: the same fine-tune calls and seeds as a pruning run."""
    model = copy.deepcopy(pretrained)
    if tuned:
        for step in range(1, STEPS + 1):
            torch.manual_seed(seed + step)
            _finetune(model, train, budget, step, seed)
        _finetune(model, train, budget, STEPS, seed, final=True)
    return model.eval()


def run_tp_l2(task, budget, seed, pretrained, x, train, tuned):
    """Torch-Pruning's group L2 pruner, stepped to the same FLOPs schedule and fine-tuned alike."""
    model = copy.deepcopy(pretrained).eval()
    torch.manual_seed(seed)
    base_macs, _ = tp.utils.count_ops_and_params(model, x)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  iterative_steps=400, pruning_ratio=0.9,
                                  ignored_layers=[model.get_submodule(last_layer(task))])
    for step in range(1, STEPS + 1):
        goal = base_macs * FLOPS_TARGET ** (step / STEPS)
        model.eval()
        macs = base_macs
        while macs > goal and pruner.current_step < pruner.iterative_steps:
            pruner.step()
            macs, _ = tp.utils.count_ops_and_params(model, x)
        torch.manual_seed(seed + step)
        _finetune(model, train, budget, step, seed)
    _finetune(model, train, budget, STEPS, seed, final=True)
    return model.eval()


def run_one(task, budget, method, seed, pretrained, x, train, flops, tuned):
    if method == "none":
        return run_none(task, budget, seed, pretrained, x, train, tuned)
    if method == "tp-l2":
        return run_tp_l2(task, budget, seed, pretrained, x, train, tuned)
    steps = STEPS if tuned else RETENTION_STEPS
    result = prunekit.prune(pretrained, x, prunekit_config(task, budget, method, seed, flops, steps, tuned),
                            progress=False)
    if not result.targets_met:
        print(f"    {method}: {result.message}", flush=True)
    return result.model.eval()


def bench_task(task: str, methods: list[str], seeds: list[int], tuned: bool) -> dict:
    budget = BUDGETS[task]
    targets = (FLOPS_TARGET,) if tuned else RETENTION_TARGETS
    metric = "IoU" if task in ("unet", "mni") else "accuracy"
    runs = []  # one row per (seed, method, target)
    before = {}
    for seed in seeds:
        t0 = time.perf_counter()
        pretrained, x, train, test = pretrained_model(task, budget, seed)
        before[seed] = evaluate(pretrained, test)
        base_flops = fvcore_counts(pretrained, x)[0]
        print(f"  {task} seed {seed}: pretrained {budget['pretrain']} iterations in {time.perf_counter() - t0:.0f} s, "
              f"test {metric} {before[seed]:.4f}", flush=True)
        state = copy.deepcopy(pretrained.state_dict())
        for method in methods:
            for flops in targets:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = run_one(task, budget, method, seed, pretrained, x, train, flops, tuned)
                seconds = time.perf_counter() - t0
                if not all(torch.equal(v, pretrained.state_dict()[k]) for k, v in state.items()):
                    raise RuntimeError(f"{method} changed the shared pretrained model")
                after = evaluate(result, test)
                runs.append({"seed": seed, "method": method, "target": flops, "after": after, "seconds": seconds,
                             "flops_ratio": fvcore_counts(result, x)[0] / base_flops})
                print(f"    {method:22s} {flops:.0%}: FLOPs {runs[-1]['flops_ratio']:.1%}, {metric} {after:.4f}, "
                      f"{seconds:.0f} s", flush=True)
                if method == "none":
                    break
    return {"task": task, "metric": metric, "budget": budget, "tuned": tuned, "before": before, "runs": runs}


# -- statistics and printing ---------------------------------------------------------------------


def paired(runs: list[dict], method: str, reference: str, target: float) -> tuple[float, float] | None:
    """Mean over seeds of (method - reference) and the half-width of its 95% t interval."""
    by = {(r["method"], r["seed"]): r["after"] for r in runs if r["target"] == target or r["method"] == "none"}
    diffs = [by[(method, s)] - by[(reference, s)] for s in sorted({r["seed"] for r in runs})
             if (method, s) in by and (reference, s) in by]
    if len(diffs) < 2:
        return None
    return statistics.fmean(diffs), T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def format_task(result: dict, methods: list[str], reference: str) -> str:
    runs, metric = result["runs"], result["metric"]
    targets = sorted({r["target"] for r in runs if r["method"] != "none"}, reverse=True)
    seeds = sorted(result["before"])
    header = ["method"] + [f"{t:.0%} FLOPs" for t in targets] + [f"vs {reference} at {t:.0%}" for t in targets]
    body = []
    for method in methods:
        cells = [method]
        for t in targets:
            values = [r["after"] for r in runs if r["method"] == method and (r["target"] == t or method == "none")]
            cells.append(f"{statistics.fmean(values):.4f}" if values else "-")
        for t in targets:
            d = paired(runs, method, reference, t) if method != reference else None
            cells.append("" if d is None else f"{d[0]:+.4f} ± {d[1]:.4f}" + (" *" if abs(d[0]) > d[1] else ""))
        body.append(cells)
    b = result["budget"]
    what = {"unet": f"reference U-Net (width 16, depth 3), nuclei tiles {UNET_TILE}x{UNET_TILE}: 48 train / 16 test, "
                    "foreground IoU",
            "shapes": f"small_cnn, synthetic shapes {b.get('train')} train / {b.get('test')} test, accuracy",
            "shapes-nobn": f"small_cnn without BatchNorm, synthetic shapes {b.get('train')} train / "
                           f"{b.get('test')} test, accuracy",
            "fmnist": f"small_cnn, Fashion-MNIST {b.get('train')} train / {b.get('test')} test, accuracy",
            "fmnist-nobn": f"small_cnn without BatchNorm, Fashion-MNIST {b.get('train')} train / {b.get('test')} "
                           "test, accuracy",
            "fmnist-resnet": f"resnet_small (width {RESNET_WIDTH}, 13 3x3 convs), Fashion-MNIST "
                             f"{b.get('train')} train / {b.get('test')} test, accuracy",
            "mni": f"U-Net (width {MNI_KWARGS['width']}, depth 3, 3 classes), MNI152 axial slices 72 train / 68 test, "
                   "mean IoU of grey and white matter",
            }[result["task"]]
    mode = (f"fine-tuned: {STEPS} steps with {b['step_iterations']} iterations each + {b['final_iterations']} final"
            if result["tuned"] else f"no fine-tuning, {RETENTION_STEPS} steps")
    unpruned = statistics.fmean(result["before"].values())
    title = (f"{result['task']}: {what}; pretrained {b['pretrain']} iterations per seed ({metric} {unpruned:.4f}); "
             f"{mode}; mean of seeds {seeds}; * = the 95% interval excludes 0")
    return "\n".join([title, "", table(header, body, set(range(1, len(header))))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["fmnist", "fmnist-nobn", "fmnist-resnet", "mni"])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="criterion[@allocation] (criteria: " + ", ".join(CRITERIA) + "), none, tp-l2")
    parser.add_argument("--reference", default="ipad", help="the method paired differences are taken against")
    parser.add_argument("--finetune", action="store_true", help="fine-tuned results at 50%% FLOPs instead of "
                                                                "retention without fine-tuning")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="pretraining, pruning and fine-tuning seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine more threads are slower)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="save all results here")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="keep pretrained weights here and reuse them (pretraining is most of a short run)")
    args = parser.parse_args(argv)
    global CACHE
    CACHE = args.cache
    torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(args.methods or (["none", *DEFAULT_METHODS] + (["tp-l2"] if args.finetune else []))))
    for method in methods:
        criterion, _, allocation = method.partition("@")
        if method not in ("none", "tp-l2") and (criterion not in CRITERIA
                                                 or allocation not in ("", *ALLOCATIONS)):
            parser.error(f"unknown method {method!r}")
    if args.reference not in methods:
        methods.insert(0, args.reference)
    if "tp-l2" in methods and (tp is None or not args.finetune):
        print("tp-l2 runs only with --finetune and Torch-Pruning installed: skipping it.")
        methods.remove("tp-l2")

    env = {"python": platform.python_version(), "torch": torch.__version__, "prunekit": prunekit.__version__,
           "torch_pruning": dist_version("torch-pruning") if tp is not None else None,
           "fvcore": dist_version("fvcore"), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "load_average": load_average()}
    print(environment_line(env), flush=True)
    started = time.perf_counter()
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for task in args.tasks:
            try:
                results.append(bench_task(task, methods, args.seeds, args.finetune))
                if args.json:  # every finished task is kept, even if a later one is stopped
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({"environment": env, "seeds": args.seeds, "tasks": results},
                                                    indent=2, default=str))
            except DataError as exc:  # a dataset this machine does not have: the other tasks still run
                print(f"  {task}: skipped: {exc}", flush=True)
    total = time.perf_counter() - started
    for result in results:
        print()
        print(format_task(result, methods, args.reference))
    print()
    print(f"Every method starts from the same pretrained weights per seed; no validation data steers pruning. "
          f"Total {total:.0f} s.")
    env["load_average_after"] = load_average()
    save_json(args.json, {"environment": env, "seeds": args.seeds, "total_seconds": total, "tasks": results},
              default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
