"""Quality at 50% of the FLOPs: IPAD vs L1 vs random (vs Torch-Pruning's L2 pruner), same model, data and budget.

    python benchmarks/quality.py                           # --budget small: about 5 minutes on 2 busy cores
    python benchmarks/quality.py --budget full --seeds 0 1 2 --json out/quality.json
    python benchmarks/quality.py --tasks unet --methods ipad l1

Two tasks, each from one shared pretrained starting point:

- unet: the reference U-Net ``unet(in_channels=1, num_classes=2, width=16,
  depth=3)`` on the nuclei tiles (``prunekit.data.datasets.nuclei_tiles``, tile
  128: 12 train tiles, 4 test tiles); metric: foreground IoU on the test tiles.
- fmnist: ``prunekit.zoo.small_cnn()`` on a Fashion-MNIST subset (the first
  N train images, the first M test images); metric: test accuracy.

The model is trained once (``prunekit.data.trainer.finetune``, seed 0) and
deep-copied for each method. Each method prunes to 50% of the FLOPs in 4
steps, fine-tunes the same number of iterations after every step and once
more at the end, with the same seeds, and is evaluated on the test split:

- ipad / l1 / random: ``prunekit.prune(model, x, config)`` with the config
  that :func:`prunekit_config` spells out (only ``importance.method`` differs).
  No validation data is given, so the test split never steers pruning; the
  last step's model (the first that meets the target) is the result.
- tp-l2: Torch-Pruning (optional, ``pip install --no-deps torch-pruning==1.6.1``):
  ``MetaPruner(MagnitudeImportance(p=2), iterative_steps=400, pruning_ratio=0.9,
  ignored_layers=[last layer])``; at step s of 4 it calls ``step()`` and
  recounts MACs until they are at most ``0.5 ** (s / 4)`` of the original,
  then fine-tunes with the same trainer, iterations and seeds as prunekit.
- none: no pruning, the same fine-tuning only (what the extra training alone gives).

The FLOPs ratio is measured with fvcore on the original and the result.
Seconds are wall-clock for pruning plus fine-tuning of one method.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from common import dist_version, environment_line, load_average, params, prunekit, save_json, table, tp
from prunekit.costs import fvcore_counts
from prunekit.data import DataError
from prunekit.data.trainer import evaluate, finetune

FLOPS_TARGET = 0.5
STEPS = 4
PRETRAIN_SEED = 0
FINAL_SEED_OFFSET = 1000  # prunekit seeds the final fine-tune with seed + best_step + 1000
METHODS = ["none", "ipad", "l1", "random", "tp-l2"]
TASKS = ["unet", "fmnist"]

# Per task and budget: data sizes, pretraining iterations, fine-tune iterations per step and at the end.
# small: about 5 minutes for everything with --threads 1 on 2 shared cores; full: a few times longer.
BUDGETS = {
    "small": {
        "unet": {"pretrain": 150, "step_iterations": 10, "final_iterations": 40},
        "fmnist": {"train": 6000, "test": 2000, "pretrain": 600, "step_iterations": 50, "final_iterations": 150},
    },
    "full": {
        "unet": {"pretrain": 600, "step_iterations": 40, "final_iterations": 120},
        "fmnist": {"train": 20000, "test": 5000, "pretrain": 3000, "step_iterations": 200,
                   "final_iterations": 600},
    },
}

# What each task trains on (data factories, also named in the prunekit configs) and how.
UNET_KWARGS = {"in_channels": 1, "num_classes": 2, "width": 16, "depth": 3}
UNET_TILE, UNET_BATCH = 128, 4
FMNIST_BATCH, FMNIST_CALIBRATION_IMAGES = 64, 512
LR = {"unet": 1e-3, "fmnist": 1e-3}
FINAL_LR = {"unet": 5e-4, "fmnist": 5e-4}


def data_sources(task: str, budget: dict) -> dict:
    """The ``data`` section of the prunekit config: calibration and training batches (no validation)."""
    if task == "unet":
        train = {"factory": "prunekit.data.datasets:nuclei_tiles",
                 "kwargs": {"split": "train", "tile": UNET_TILE, "batch_size": UNET_BATCH}}
        return {"calibration": train, "train": train}
    train = {"factory": "prunekit.data.datasets:fashion_mnist",
             "kwargs": {"split": "train", "limit": budget["train"], "batch_size": FMNIST_BATCH}}
    calibration = {"factory": "prunekit.data.datasets:fashion_mnist",
                   "kwargs": {"split": "train", "limit": FMNIST_CALIBRATION_IMAGES, "batch_size": FMNIST_BATCH}}
    return {"calibration": calibration, "train": train}


def prunekit_config(task: str, budget: dict, method: str, seed: int) -> dict:
    """The exact prunekit config of one run; only ``importance.method`` and ``seed`` vary."""
    return {
        "targets": {"flops": FLOPS_TARGET, "params": 1.0, "stop_when": "both", "priority": "flops"},
        "importance": {"method": method, "norm": 1, "omega": 0.0, "combine": "mean"},
        "limits": {"default": 0.75, "layers": {last_layer(task): 0.0}, "round_to": 1},
        "schedule": {
            "steps": STEPS,
            "finetune": {"iterations": budget["step_iterations"], "lr": LR[task], "weight_decay": 0.0,
                         "augment": True},
            "final_finetune": {"iterations": budget["final_iterations"], "lr": FINAL_LR[task],
                               "weight_decay": 0.0, "augment": True},
        },
        "data": data_sources(task, budget),
        "validate": None,
        "keep_best": 3,
        "seed": seed,
    }


def last_layer(task: str) -> str:
    return "out" if task == "unet" else "fc2"


def load_task(task: str, budget: dict):
    """(fresh model, example input, train batches, test batches)."""
    from prunekit import zoo
    from prunekit.data import datasets

    torch.manual_seed(PRETRAIN_SEED)
    if task == "unet":
        model = zoo.unet(**UNET_KWARGS)
        train = datasets.nuclei_tiles("train", tile=UNET_TILE, batch_size=UNET_BATCH)
        test = datasets.nuclei_tiles("test", tile=UNET_TILE, batch_size=UNET_BATCH)
        x = torch.zeros(1, 1, UNET_TILE, UNET_TILE)
    else:
        model = zoo.small_cnn()
        train = datasets.fashion_mnist("train", limit=budget["train"], batch_size=FMNIST_BATCH)
        test = datasets.fashion_mnist("test", limit=budget["test"], batch_size=500)
        x = torch.zeros(1, 1, 28, 28)
    return model, x, train, test


# -- the methods: each takes the pretrained model and returns a pruned, fine-tuned one ------------------


def run_prunekit(task, budget, method, seed, pretrained, x, train):
    config = prunekit_config(task, budget, method, seed)
    result = prunekit.prune(pretrained, x, config, progress=False)
    if not result.targets_met:
        print(f"    prunekit {method}: {result.message}", flush=True)
    return result.model


def _finetune(model, train, task, budget, step, seed, final=False):
    iterations = budget["final_iterations" if final else "step_iterations"]
    finetune(model, train, iterations, lr=(FINAL_LR if final else LR)[task], weight_decay=0.0, task="auto",
             use_augment=True, seed=seed + step + (FINAL_SEED_OFFSET if final else 0), show_progress=False)


def run_none(task, budget, seed, pretrained, x, train):
    """No pruning: the same fine-tune calls and seeds as a pruning run."""
    model = copy.deepcopy(pretrained)
    for step in range(1, STEPS + 1):
        torch.manual_seed(seed + step)
        _finetune(model, train, task, budget, step, seed)
    _finetune(model, train, task, budget, STEPS, seed, final=True)
    return model.eval()


def run_tp_l2(task, budget, seed, pretrained, x, train):
    """Torch-Pruning's L2 magnitude pruner, stepped to the same FLOPs schedule and fine-tuned alike."""
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
        _finetune(model, train, task, budget, step, seed)
    _finetune(model, train, task, budget, STEPS, seed, final=True)
    return model.eval()


def bench_task(task: str, budget_name: str, methods: list[str], seeds: list[int]) -> dict:
    budget = BUDGETS[budget_name][task]
    model, x, train, test = load_task(task, budget)
    t0 = time.perf_counter()
    finetune(model, train, budget["pretrain"], lr=LR[task], seed=PRETRAIN_SEED, show_progress=False)
    pretrain_seconds = time.perf_counter() - t0
    pretrained = model.eval()
    before = evaluate(pretrained, test)
    base_flops, base_params = fvcore_counts(pretrained, x)[0], params(pretrained)
    metric = "IoU" if task == "unet" else "accuracy"
    print(f"  {task}: pretrained {budget['pretrain']} iterations in {pretrain_seconds:.0f} s, "
          f"test {metric} {before:.4f}", flush=True)
    rows = []
    for method in methods:
        runs = []
        for seed in seeds:
            state = copy.deepcopy(pretrained.state_dict())
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if method == "none":
                    result = run_none(task, budget, seed, pretrained, x, train)
                elif method == "tp-l2":
                    result = run_tp_l2(task, budget, seed, pretrained, x, train)
                else:
                    result = run_prunekit(task, budget, method, seed, pretrained, x, train)
            seconds = time.perf_counter() - t0
            unchanged = all(torch.equal(v, pretrained.state_dict()[k]) for k, v in state.items())
            if not unchanged:
                raise RuntimeError(f"{method} changed the shared pretrained model")
            after = evaluate(result, test)
            runs.append({"seed": seed, "flops_ratio": fvcore_counts(result, x)[0] / base_flops,
                         "params_ratio": params(result) / base_params, "after": after, "seconds": seconds})
            print(f"    {method:7s} seed {seed}: FLOPs {runs[-1]['flops_ratio']:.2%}, {metric} {after:.4f}, "
                  f"{seconds:.0f} s", flush=True)
        rows.append({"method": method, "runs": runs})
    config_example = {m: prunekit_config(task, budget, m, seeds[0]) for m in methods if m in ("ipad", "l1", "random")}
    return {"task": task, "metric": metric, "budget": budget, "before": before, "fvcore_flops": base_flops,
            "params": base_params, "pretrain_seconds": pretrain_seconds, "rows": rows,
            "prunekit_configs": config_example}


# -- printing ----------------------------------------------------------------------


def _mean(runs: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def format_task(result: dict, seeds: list[int]) -> str:
    several = len(seeds) > 1
    metric = result["metric"]
    header = ["method", "FLOPs", "params", f"{metric} before", f"{metric} after"]
    header += ["after min..max"] if several else []
    header += ["seconds"]
    body = []
    for row in result["rows"]:
        runs = row["runs"]
        cells = [row["method"], f"{_mean(runs, 'flops_ratio'):.2%}", f"{_mean(runs, 'params_ratio'):.1%}",
                 f"{result['before']:.4f}", f"{_mean(runs, 'after'):.4f}"]
        if several:
            cells.append(f"{min(r['after'] for r in runs):.4f}..{max(r['after'] for r in runs):.4f}")
        cells.append(f"{_mean(runs, 'seconds'):.0f}")
        body.append(cells)
    b = result["budget"]
    what = ("reference U-Net (in 1, classes 2, width 16, depth 3), nuclei tiles 128x128: 12 train / 4 test, "
            "foreground IoU" if result["task"] == "unet" else
            f"small_cnn, Fashion-MNIST {b['train']} train / {b['test']} test images, accuracy")
    title = (f"{result['task']}: {what}; pretrained {b['pretrain']} iterations, then {STEPS} steps to "
             f"{FLOPS_TARGET:.0%} FLOPs with {b['step_iterations']} fine-tune iterations each + "
             f"{b['final_iterations']} final" + (f"; mean of seeds {seeds}" if several else f"; seed {seeds[0]}"))
    return "\n".join([title, "", table(header, body, set(range(1, len(header))))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small",
                        help="small (default): about 5 minutes on 2 busy cores; full: longer training")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS, help="default: both")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="default: all (tp-l2 only when Torch-Pruning is installed)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="pruning / fine-tuning seeds, the same for every method (default 0); "
                             "several: the table shows the mean")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine more threads are slower)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="save all results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(args.methods))
    if "tp-l2" in methods and tp is None:
        print("Torch-Pruning is not installed (pip install --no-deps torch-pruning==1.6.1): skipping tp-l2.")
        methods.remove("tp-l2")

    env = {"python": platform.python_version(), "torch": torch.__version__, "prunekit": prunekit.__version__,
           "torch_pruning": dist_version("torch-pruning") if tp is not None else None,
           "fvcore": dist_version("fvcore"), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "machine": platform.machine(), "load_average": load_average()}
    print(f"{environment_line(env)}; budget {args.budget}", flush=True)
    started = time.perf_counter()
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for task in args.tasks:
            try:
                results.append(bench_task(task, args.budget, methods, args.seeds))
            except DataError as exc:  # a dataset this machine does not have: the other tasks still run
                print(f"  {task}: skipped: {exc}", flush=True)
    total = time.perf_counter() - started
    for result in results:
        print()
        print(format_task(result, args.seeds))
    print()
    print(f"FLOPs / params = result / pretrained (FLOPs counted by fvcore). Every method starts from the same "
          f"pretrained weights and uses the same fine-tune iterations and seeds; no validation data steers "
          f"pruning. seconds = pruning + fine-tuning, wall clock. Total {total:.0f} s.")
    env["load_average_after"] = load_average()
    save_json(args.json, {"environment": env, "budget": args.budget, "seeds": args.seeds, "total_seconds": total,
                          "tasks": results}, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
