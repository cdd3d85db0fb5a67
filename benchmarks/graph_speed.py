"""How fast prunekit builds a channel graph and cuts half the channels, next to Torch-Pruning.

    python benchmarks/graph_speed.py                       # every model, best of 3 after a warm-up
    python benchmarks/graph_speed.py --models resnet50 unet --repeats 5 --json out/graph_speed.json

prunekit: ``build_graph`` + ``remove_channels`` with the first half of every
producer's prunable channels (each selection is expanded to its coupled
units, so about half of the channels go). Torch-Pruning (optional,
``pip install --no-deps torch-pruning==1.6.1``): ``MetaPruner`` construction
(its dependency graph) + one ``step()`` at ``pruning_ratio=0.5``, with the
final classifier / output conv ignored. Without Torch-Pruning only prunekit's
numbers are printed.

Every run works on a fresh deep copy of the model (copying is not timed).
Both pruned models are checked to run, and their FLOPs are counted with the
same counter (``prunekit.count_flops_params``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import warnings
from typing import Callable

import torch
from torch import nn

from common import CLOCKS, add_threads_clock_json, apply_threads_clock, check_runs, environment, \
    environment_line, load_average, prunekit, save_json, table, tp

MODELS = ["resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "unet"]
SCALING = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
TARGET = 0.5  # prunekit total <= TARGET x Torch-Pruning's time
clock = CLOCKS["wall"]  # --clock cpu: this process's CPU time, steadier on a shared machine


def build_model(name: str) -> tuple[nn.Module, torch.Tensor, Callable[[nn.Module], list[nn.Module]]]:
    """The model (eval mode, random weights), its example input, and what TP must leave alone."""
    torch.manual_seed(0)
    if name == "unet":
        from prunekit.zoo import unet

        return unet().eval(), torch.randn(1, 3, 256, 256), lambda m: [m.out]
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval()

    def classifier(m: nn.Module) -> list[nn.Module]:
        return [[mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]]

    return model, torch.randn(1, 3, 224, 224), classifier


# -- one timed run of each tool -------------------------------------------------


def run_prunekit(model: nn.Module, x: torch.Tensor) -> tuple[float, float, nn.Module, object]:
    t0 = clock()
    graph = prunekit.build_graph(model, x)
    t1 = clock()
    sel = {name: idx[: len(idx) // 2] for name, idx in graph.prunable_channels().items()}
    pruned = prunekit.remove_channels(model, x, sel, graph=graph)
    t2 = clock()
    return t1 - t0, t2 - t1, pruned, graph


def run_tp(model: nn.Module, x: torch.Tensor, ignored: list[nn.Module]) -> tuple[float, nn.Module]:
    t0 = clock()
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=ignored
    )
    pruner.step()
    t1 = clock()
    return t1 - t0, model


def timed(fn: Callable[[], tuple], repeats: int, warmup: int = 1) -> list[tuple]:
    """``fn`` run ``warmup`` times untimed, then ``repeats`` times; the repeats' results."""
    out = []
    for i in range(warmup + repeats):
        gc.collect()
        result = fn()
        if i >= warmup:
            out.append(result)
    return out


def stats(seconds: list[float]) -> dict[str, float]:
    return {"best": min(seconds), "median": statistics.median(seconds), "runs": seconds}


def flops_params(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    return prunekit.count_flops_params(model, x)


# -- the benchmarks ----------------------------------------------------------------


def bench_model(name: str, repeats: int) -> dict:
    model, x, ignored_of = build_model(name)
    base = flops_params(model, x)
    row: dict = {"model": name, "input": list(x.shape), "flops": base["flops"], "params": base["params"]}

    runs = timed(lambda: run_prunekit(copy.deepcopy(model), x), repeats)
    build = [r[0] for r in runs]
    remove = [r[1] for r in runs]
    total = [b + r for b, r in zip(build, remove)]
    pruned, graph = runs[-1][2], runs[-1][3]
    check_runs(model, pruned, x, "prunekit")
    cost = flops_params(pruned, x)
    row["prunekit"] = {
        "build": stats(build), "remove": stats(remove), "total": stats(total),
        "nodes": len(list(graph.fx_graph.nodes)), "units": graph.num_units,
        "flops_kept": cost["flops"] / base["flops"], "params_kept": cost["params"] / base["params"],
    }
    del runs, pruned, graph

    if tp is not None:
        def one_tp():
            m = copy.deepcopy(model)
            return run_tp(m, x, ignored_of(m))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs = timed(one_tp, repeats)
        seconds = [r[0] for r in runs]
        pruned = runs[-1][1]
        check_runs(model, pruned, x, "Torch-Pruning")
        cost = flops_params(pruned, x)
        row["tp"] = {"total": stats(seconds), "flops_kept": cost["flops"] / base["flops"],
                     "params_kept": cost["params"] / base["params"]}
        row["ratio_best"] = row["prunekit"]["total"]["best"] / row["tp"]["total"]["best"]
        row["ratio_median"] = row["prunekit"]["total"]["median"] / row["tp"]["total"]["median"]
        del runs, pruned
    return row


def build_only(model: nn.Module, x: torch.Tensor) -> tuple[float, object]:
    t0 = clock()
    graph = prunekit.build_graph(model, x)
    return clock() - t0, graph


def bench_scaling(names: list[str], repeats: int) -> list[dict]:
    rows = []
    for name in names:
        model, x, _ = build_model(name)
        runs = timed(lambda: build_only(model, x), repeats)
        seconds = [r[0] for r in runs]
        nodes = len(list(runs[-1][1].fx_graph.nodes))
        s = stats(seconds)
        rows.append({"model": name, "nodes": nodes, "build": s,
                     "us_per_node_best": 1e6 * s["best"] / nodes, "us_per_node_median": 1e6 * s["median"] / nodes})
    return rows


# -- printing ----------------------------------------------------------------------


def format_results(rows: list[dict], repeats: int, clock_name: str = "wall") -> str:
    have_tp = any("tp" in r for r in rows)
    header = ["model", "nodes", "pk build", "pk remove", "pk total", "pk total med"]
    if have_tp:
        header += ["TP", "TP med", "pk/TP", "pk/TP med", "target"]
    header += ["FLOPs kept pk"] + (["FLOPs kept TP"] if have_tp else [])
    body = []
    for r in rows:
        pk = r["prunekit"]
        cells = [r["model"], pk["nodes"], f"{pk['build']['best']:.3f}", f"{pk['remove']['best']:.3f}",
                 f"{pk['total']['best']:.3f}", f"{pk['total']['median']:.3f}"]
        if have_tp:
            if "tp" in r:
                cells += [f"{r['tp']['total']['best']:.3f}", f"{r['tp']['total']['median']:.3f}",
                          f"{r['ratio_best']:.2f}x", f"{r['ratio_median']:.2f}x",
                          "ok" if r["ratio_best"] <= TARGET else "MISSED"]
            else:
                cells += ["-"] * 5
        cells.append(f"{pk['flops_kept']:.1%}")
        if have_tp:
            cells.append(f"{r['tp']['flops_kept']:.1%}" if "tp" in r else "-")
        body.append(cells)
    title = (f"Channel graph + remove half the channels: {clock_name}-clock seconds, best of {repeats} "
             f"after 1 warm-up (med = median); target pk/TP <= {TARGET}")
    notes = ["pk = prunekit: build_graph (build) + prunable_channels, remove_channels (remove)."]
    if have_tp:
        notes.append("TP = Torch-Pruning: MetaPruner(pruning_ratio=0.5, classifier/output conv ignored) + one step(); "
                     "pk/TP = prunekit total / TP.")
    else:
        notes.append("Torch-Pruning is not installed (pip install --no-deps torch-pruning==1.6.1): prunekit only.")
    notes.append("FLOPs kept = pruned / original FLOPs, all counted by prunekit.count_flops_params.")
    return "\n".join([title, "", table(header, body, set(range(1, len(header)))), "", *notes])


def format_scaling(rows: list[dict], repeats: int, clock_name: str = "wall") -> str:
    header = ["model", "nodes", "build best s", "build med s", "us/node best", "us/node med"]
    body = [[r["model"], r["nodes"], f"{r['build']['best']:.3f}", f"{r['build']['median']:.3f}",
             f"{r['us_per_node_best']:.0f}", f"{r['us_per_node_median']:.0f}"] for r in rows]
    per_node = [r["us_per_node_best"] for r in rows]
    spread = max(per_node) / min(per_node) if per_node else float("nan")
    verdict = ("roughly constant: grouping scales linearly" if spread <= 1.5
               else "NOT constant: look for superlinear work")
    return "\n".join([f"Grouping scales linearly: build_graph {clock_name}-clock time per graph node "
                      f"(best of {repeats}, med = median)", "",
                      table(header, body, set(range(1, len(header)))), "",
                      f"us/node max/min = {spread:.2f} ({verdict})"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="NAME",
                        help=f"subset of {', '.join(MODELS)} (any torchvision model name works)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--scaling", nargs="*", default=SCALING, metavar="NAME",
                        help="models for the per-node check (default resnet18..152; give none to skip)")
    add_threads_clock_json(parser, "save all timings here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    global clock
    clock = apply_threads_clock(args)

    env = environment()
    print(environment_line(env), flush=True)
    rows, scaling = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchvision / torch.jit deprecation chatter
        for name in args.models:
            print(f"  {name} ...", flush=True)
            rows.append(bench_model(name, args.repeats))
        print()
        print(format_results(rows, args.repeats, args.clock))
        if args.scaling:
            print(flush=True)
            scaling = bench_scaling(args.scaling, args.repeats)
            print(format_scaling(scaling, args.repeats, args.clock))
    env["load_average_after"] = load_average()
    save_json(args.json, {"environment": env, "clock": args.clock, "repeats": args.repeats, "target": TARGET,
                          "models": rows, "scaling": scaling})
    return 0


if __name__ == "__main__":
    sys.exit(main())
