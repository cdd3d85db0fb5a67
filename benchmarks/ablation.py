"""Does a criterion rank filters by the damage their removal does? Rank correlation with a one-unit ablation.

    python benchmarks/ablation.py                                  # fmnist, fmnist-nobn, fmnist-resnet, mni
    python benchmarks/ablation.py --tasks mni --seeds 0 1 2 --json out/ablation.json

For the pretrained model of a task of :mod:`quality` (the same pretraining, seeds and data), every
prunable unit (one channel with every layer its removal couples: a filter, or a residual channel)
is removed alone with prunekit's surgery on the traced graph, and its damage is the increase of the
test loss (cross-entropy; for segmentation the training loss, cross-entropy + Dice). Each criterion
of :data:`quality.CRITERIA` scores the units through ``prunekit.importance.score_units`` with the
calibration images prunekit would read (and the training batches for fisher). Reported: Spearman's
rank correlation of score and damage within each layer group (units that share their producers;
uniform allocation ranks within these), their mean, and over all units with each layer's scores
divided by the layer's mean (what global allocation ranks). A good criterion is near +1; random is
near 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from common import prunekit, save_json, table
from prunekit.data import DataError
from prunekit.data.trainer import loss_for, main_output, task_of
from prunekit.importance import score_units
from prunekit.surgery import apply_removal

import quality

CRITERIA = list(quality.CRITERIA)
MIN_GROUP = 4  # a group with fewer prunable units gets no correlation of its own
TEST_IMAGES = 500  # classification: the first 500 test images (every removal is one pass over them)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(len(values))
    for v in np.unique(values):
        tied = values == v
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def test_loss(model, batches) -> float:
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for x, y in batches:
            out = main_output(model(x))
            total += float(loss_for(task_of(out, y))(out, y)) * len(x)
            count += len(x)
    return total / count


def calibration(task: str, train) -> list:
    """The images prunekit's calibration source gives for ``task`` (see :func:`quality.data_sources`)."""
    if task.startswith("fmnist"):
        images = torch.cat([x for x, _ in train])[:quality.CALIBRATION_IMAGES]
        return list(images.split(quality.CNN_BATCH))
    return [x for x, _ in train]


def unit_damage(model, graph, test) -> np.ndarray:
    """Test loss increase when each prunable unit alone is removed; nan for pinned units."""
    base = test_loss(model, test)
    out = np.full(graph.num_units, np.nan)
    for u in np.flatnonzero(~graph.pinned):
        out[u] = test_loss(apply_removal(model, graph, graph.removal_mask([u])), test) - base
    return out


def criterion_scores(model, graph, criterion: str, inputs, train, seed: int) -> np.ndarray:
    spec = dict(quality.CRITERIA[criterion])
    method = spec.pop("method")
    options = {"norm": 1, "omega": 0.0, "scale": "layer", "measure": "raw", "propagate": 0.0, "seed": seed,
               "loss_batches": train, "loss_fn": lambda out, y: loss_for(task_of(main_output(out), y))(
                   main_output(out), y), **spec}
    return score_units(model, graph, method, inputs, options, allocation="global")


def ablate(task: str, seed: int, criteria: list[str]) -> dict:
    budget = quality.BUDGETS[task]
    t0 = time.perf_counter()
    model, x, train, test = quality.pretrained_model(task, budget, seed)
    graph = prunekit.build_graph(model, x)
    if task != "mni" and task != "unet":
        images, labels = torch.cat([x for x, _ in test])[:TEST_IMAGES], torch.cat([y for _, y in test])[:TEST_IMAGES]
        test = [(images, labels)]
    damage = unit_damage(model, graph, test)
    print(f"  {task} seed {seed}: {int(np.isfinite(damage).sum())} units ablated, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    inputs = calibration(task, train)
    groups = [(g.producers[0] + (f" +{len(g.producers) - 1}" if len(g.producers) > 1 else ""),
               np.array(g.prunable_units)) for g in graph.groups
              if len(g.prunable_units) >= MIN_GROUP]
    result = {"task": task, "seed": seed, "groups": [name for name, _ in groups], "per_group": {}, "overall": {},
              "damage": damage[np.isfinite(damage)].tolist()}
    prunable = np.flatnonzero(np.isfinite(damage))
    for criterion in criteria:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = criterion_scores(model, graph, criterion, inputs, train, seed)
        result["per_group"][criterion] = [spearman(scores[units], damage[units]) for _, units in groups]
        result["overall"][criterion] = spearman(scores[prunable], damage[prunable])
    return result


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def format_task(runs: list[dict], criteria: list[str]) -> str:
    """Rows: all units, the mean over layer groups, then each group; columns: criteria."""
    task, groups = runs[0]["task"], runs[0]["groups"]
    per_group = {c: [_mean(r["per_group"][c][i] for r in runs) for i in range(len(groups))] for c in criteria}
    body = [["all units (global)"] + [f"{_mean(r['overall'][c] for r in runs):+.2f}" for c in criteria],
            ["mean of layers"] + [f"{_mean(per_group[c]):+.2f}" for c in criteria]]
    body += [[name] + [f"{per_group[c][i]:+.2f}" for c in criteria] for i, name in enumerate(groups)]
    units = len(runs[0]["damage"])
    title = (f"{task}: Spearman correlation of each criterion's scores with the test-loss increase when one unit "
             f"is removed ({units} units), mean over seeds {[r['seed'] for r in runs]}; a group '+n' couples n more "
             f"producers")
    return "\n".join([title, "", table(["units", *criteria], body, set(range(1, len(criteria) + 1)))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=quality.TASKS,
                        default=["fmnist", "fmnist-nobn", "fmnist-resnet", "mni"])
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=CRITERIA)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="save all results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for task in args.tasks:
            try:
                results[task] = [ablate(task, seed, args.criteria) for seed in args.seeds]
            except DataError as exc:
                print(f"  {task}: skipped: {exc}", flush=True)
    for runs in results.values():
        print()
        print(format_task(runs, args.criteria))
    save_json(args.json, {"seeds": args.seeds, "tasks": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
