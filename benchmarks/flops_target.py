"""How long it takes to reach 50% of the FLOPs, prunekit next to Torch-Pruning's iterative recipe.

    python benchmarks/flops_target.py                                  # resnet50, densenet121, unet; 1 run each
    python benchmarks/flops_target.py --models resnet50 unet --repeats 3 --json out/flops_target.json

prunekit: ``prunekit.prune(model, x, CONFIG, progress=False)`` with the
config below (L1 filter norms, 8 geometric steps, no fine-tuning, widths not aligned:
``round_to: 1``; the "round_to 8" column aligns them, as the default does): it prices
every candidate removal analytically and cuts until the FLOPs target holds.

Torch-Pruning (optional, ``pip install --no-deps torch-pruning==1.6.1``): its
own recipe for a FLOPs target, many tiny steps and a recount after each::

    base_macs, _ = tp.utils.count_ops_and_params(model, x)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  iterative_steps=400, pruning_ratio=0.9, ignored_layers=[classifier])
    for _ in range(400):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, x)
        if macs <= 0.5 * base_macs:
            break

Both are timed from the unpruned model to the pruned one (model building and
the deep copy are not timed). The FLOPs ratio of each result is measured
with fvcore (``prunekit.costs.fvcore_counts``) on the original and the
pruned model, outside the timing, and both pruned models are run once.

Command line (``--no-cli`` skips it): ``python -m prunekit prune model.pt -c config.yaml -o run -q``
in a fresh process, timed end to end (start, imports, loading, pruning, the run directory), with
the model's state_dict written beforehand and a config equal to the API's plus the builder
(``torchvision.models:NAME`` with ``weights: null``, or ``prunekit.zoo:unet``) and the input
shape; its widths must equal the API's. Beside it: the start-up (``python -m prunekit --help``)
and the imports a prune cannot avoid (``import prunekit.loop`` and the builder's module). Target:
CLI seconds <= 2 x API seconds + those imports (a prune's start-up). With ``--clock cpu`` a subprocess's time is its
user + system CPU time (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from common import CLOCKS, add_threads_clock_json, apply_threads_clock, check_runs, environment, \
    environment_line, load_average, params, prunekit, save_json, table, tp
from prunekit.costs import fvcore_counts

MODELS = ["resnet50", "densenet121", "unet"]
FLOPS_TARGET = 0.5
TOLERANCE = 0.01  # "within 1% of the target": final FLOPs ratio in [0.49, 0.50]
SPEEDUP_TARGET = 20.0  # TP seconds / prunekit seconds >= this

TP_STEPS = 400
TP_RATIO = 0.9  # TP's per-layer ratio after all 400 steps; 50% FLOPs is reached long before


def prunekit_config(last_layer: str) -> dict:
    """The exact prunekit config: 50% FLOPs, parameters free, L1 norms, 8 steps, no fine-tuning."""
    return {
        "targets": {"flops": FLOPS_TARGET, "params": 1.0},
        "importance": {"method": "l1"},
        "schedule": {"steps": 8},
        "limits": {"default": 0.9, "layers": {last_layer: 0}, "round_to": 1},
    }


clock = CLOCKS["wall"]
clock_name = "wall"
threads: int | None = None
ROOT = Path(__file__).resolve().parents[1]
CLI_TARGET = 2.0  # CLI seconds <= CLI_TARGET x API seconds + the imports a prune cannot avoid


def build_model(name: str) -> tuple[nn.Module, torch.Tensor, str]:
    """The model (eval mode, random weights, seed 0), its example input, and the name of its last layer."""
    torch.manual_seed(0)
    if name == "unet":
        from prunekit.zoo import unet

        return unet().eval(), torch.randn(1, 3, 256, 256), "out"
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval()
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return model, torch.randn(1, 3, 224, 224), last


# -- one timed run of each tool ----------------------------------------------------


def run_prunekit(model: nn.Module, x: torch.Tensor, last: str, round_to: int = 1) -> dict:
    config = prunekit_config(last)
    config["limits"]["round_to"] = round_to
    t0 = clock()
    result = prunekit.prune(model, x, config, progress=False)
    seconds = clock() - t0
    return {"seconds": seconds, "model": result.model, "steps": len(result.history),
            "analytic_ratio": result.final["flops"] / result.original["flops"], "message": result.message,
            "modules": result.manifest["modules"]}


def run_tp(model: nn.Module, x: torch.Tensor, last: str, time_limit: float | None) -> dict:
    """TP's recipe on ``model`` (modified in place); stops early, unfinished, past ``time_limit`` seconds."""
    ignored = [model.get_submodule(last)]
    t0 = clock()
    base_macs, _ = tp.utils.count_ops_and_params(model, x)
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  iterative_steps=TP_STEPS, pruning_ratio=TP_RATIO, ignored_layers=ignored)
    steps, macs, reached = 0, base_macs, False
    for _ in range(TP_STEPS):
        pruner.step()
        steps += 1
        macs, _ = tp.utils.count_ops_and_params(model, x)
        if macs <= FLOPS_TARGET * base_macs:
            reached = True
            break
        if time_limit is not None and clock() - t0 > time_limit:
            break
    seconds = clock() - t0
    return {"seconds": seconds, "model": model, "steps": steps, "tp_ratio": macs / base_macs, "finished": reached}


def run_python(args: list[str], cwd: Path) -> float:
    """Seconds (on ``clock_name``'s clock) of ``python ARGS`` in a fresh process, the checkout first on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime if clock_name == "cpu" else wall


def cli_files(name: str, model: nn.Module, x: torch.Tensor, last: str, directory: Path) -> str:
    """The model's state_dict and a config equal to the API's, for ``prunekit prune``; the builder's module."""
    torch.save(model.state_dict(), directory / "model.pt")
    builder, kwargs = ("prunekit.zoo:unet", {}) if name == "unet" else (f"torchvision.models:{name}",
                                                                      {"weights": None})
    config = {"model": {"builder": builder, "kwargs": kwargs}, "input_shape": list(x.shape), **prunekit_config(last)}
    (directory / "config.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    return builder.split(":")[0]


def bench_cli(name: str, model: nn.Module, x: torch.Tensor, last: str, repeats: int, api_modules: dict) -> dict:
    """``prunekit prune`` end to end, its start-up and the unavoidable imports, each in fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        module = cli_files(name, model, x, last, work)
        seconds = [run_python(["-m", "prunekit", "prune", "model.pt", "-c", "config.yaml", "-o", f"run{i}", "-q"],
                              work) for i in range(repeats)]
        manifest = json.loads((work / "run0" / "manifest.json").read_text())
        startup = min(run_python(["-m", "prunekit", "--help"], work) for _ in range(max(3, repeats)))
        imports = min(run_python(["-c", f"import prunekit.loop, {module}"], work) for _ in range(max(3, repeats)))
    return {"seconds": seconds, "best": min(seconds), "startup": startup, "imports": imports,
            "same_widths": manifest["modules"] == json.loads(json.dumps(api_modules))}


def within(ratio: float) -> bool:
    return FLOPS_TARGET - TOLERANCE <= ratio <= FLOPS_TARGET + 1e-9


def bench_model(name: str, repeats: int, use_tp: bool, tp_time_limit: float | None, use_cli: bool = False) -> dict:
    model, x, last = build_model(name)
    base_flops = fvcore_counts(model, x)[0]
    base_params = params(model)
    row: dict = {"model": name, "input": list(x.shape), "last_layer": last, "fvcore_flops": base_flops,
                 "params": base_params, "config": prunekit_config(last)}

    runs = []
    for _ in range(repeats):
        gc.collect()
        runs.append(run_prunekit(model, x, last))  # prune() deep-copies: the model is not changed
    pruned = runs[-1]["model"]
    check_runs(model, pruned, x, "prunekit")
    ratio = fvcore_counts(pruned, x)[0] / base_flops
    seconds = [r["seconds"] for r in runs]
    row["prunekit"] = {"seconds": seconds, "best": min(seconds), "median": statistics.median(seconds),
                       "steps": runs[-1]["steps"], "message": runs[-1]["message"],
                       "analytic_ratio": runs[-1]["analytic_ratio"], "fvcore_ratio": ratio,
                       "params_ratio": params(pruned) / base_params, "within_1pct": within(ratio)}
    rounded = []
    for _ in range(repeats):
        gc.collect()  # as before the unaligned runs: neither pays for the other's garbage
        rounded.append(run_prunekit(model, x, last, round_to=8)["seconds"])
    row["round_to_8"] = {"seconds": rounded, "best": min(rounded), "ratio": min(rounded) / min(seconds)}
    if use_cli:
        cli = row["cli"] = bench_cli(name, model, x, last, repeats, runs[-1]["modules"])
        cli["ratio"] = cli["best"] / (CLI_TARGET * row["prunekit"]["best"] + cli["imports"])
    del runs, pruned

    if use_tp:
        runs = []
        for _ in range(repeats):
            m = copy.deepcopy(model)
            gc.collect()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.append(run_tp(m, x, last, tp_time_limit))
        pruned = runs[-1]["model"]
        check_runs(model, pruned, x, "Torch-Pruning")
        ratio = fvcore_counts(pruned, x)[0] / base_flops
        seconds = [r["seconds"] for r in runs]
        finished = all(r["finished"] for r in runs)
        row["tp"] = {"seconds": seconds, "best": min(seconds), "median": statistics.median(seconds),
                     "steps": runs[-1]["steps"], "tp_ratio": runs[-1]["tp_ratio"], "finished": finished,
                     "fvcore_ratio": ratio, "params_ratio": params(pruned) / base_params,
                     "within_1pct": within(ratio) and finished}
        # an unfinished TP run (--tp-time-limit) makes the speed-up a lower bound
        row["speedup"] = row["tp"]["best"] / row["prunekit"]["best"]
        row["speedup_is_lower_bound"] = not finished
        del runs, pruned
    return row


# -- printing ----------------------------------------------------------------------


def format_results(rows: list[dict], repeats: int, clock_name: str = "wall") -> str:
    have_tp = any("tp" in r for r in rows)
    header = ["model", "pk s", "pk steps", "pk FLOPs", "pk params", "pk 1%", "round_to 8 s", "x unrounded"]
    if have_tp:
        header += ["TP s", "TP steps", "TP FLOPs", "TP params", "TP 1%", "TP/pk", "target"]
    body = []
    for r in rows:
        pk = r["prunekit"]
        cells = [r["model"], f"{pk['best']:.2f}", pk["steps"], f"{pk['fvcore_ratio']:.2%}",
                 f"{pk['params_ratio']:.1%}", "yes" if pk["within_1pct"] else "NO",
                 f"{r['round_to_8']['best']:.2f}", f"{r['round_to_8']['ratio']:.2f}"]
        if have_tp and "tp" in r:
            t = r["tp"]
            bound = ">=" if r["speedup_is_lower_bound"] else ""
            cells += [f"{bound}{t['best']:.1f}", t["steps"], f"{t['fvcore_ratio']:.2%}",
                      f"{t['params_ratio']:.1%}",
                      ("yes" if t["within_1pct"] else "NO") if t["finished"] else "unfinished",
                      f"{bound}{r['speedup']:.1f}x", "ok" if r["speedup"] >= SPEEDUP_TARGET else
                      ("?" if r["speedup_is_lower_bound"] else "MISSED")]
        elif have_tp:
            cells += ["-"] * 7
        body.append(cells)
    runs = "1 run" if repeats == 1 else f"best of {repeats} runs"
    title = (f"Time to {FLOPS_TARGET:.0%} of the FLOPs, no fine-tuning: {clock_name}-clock seconds, {runs}; "
             f"targets: TP/pk >= {SPEEDUP_TARGET:.0f}x, FLOPs within 1% "
             f"([{FLOPS_TARGET - TOLERANCE:.2f}, {FLOPS_TARGET:.2f}])")
    notes = ["pk = prunekit.prune, config {targets: {flops: 0.5, params: 1.0}, importance: {method: l1}, "
             "schedule: {steps: 8}, limits: {default: 0.9, layers: {<last layer>: 0}, round_to: 1}}.",
             "FLOPs / params = pruned / original, FLOPs counted by fvcore (1 multiply-add = 1 flop); "
             "1% = FLOPs ratio in [0.49, 0.50].",
             "round_to 8 s: the same config with limits.round_to: 8 (target: at most 1.2 x unrounded)."]
    if have_tp:
        notes.append(f"TP = Torch-Pruning MetaPruner(MagnitudeImportance(p=1), iterative_steps={TP_STEPS}, "
                     f"pruning_ratio={TP_RATIO}, last layer ignored), step() + count_ops_and_params "
                     "until MACs <= 50%; TP steps = step() calls; TP/pk = TP seconds / prunekit seconds.")
        if any(r.get("speedup_is_lower_bound") for r in rows):
            notes.append("'>=': TP stopped at --tp-time-limit before reaching the target, so its time "
                         "and the speed-up are lower bounds.")
    elif tp is None:
        notes.append("Torch-Pruning is not installed (pip install --no-deps torch-pruning==1.6.1): prunekit only.")
    else:
        notes.append("Torch-Pruning skipped (--no-tp): prunekit only.")
    text = [title, "", table(header, body, set(range(1, len(header)))), "", *notes]
    if any("cli" in r for r in rows):
        text += ["", format_cli(rows, runs, clock_name)]
    return "\n".join(text)


def format_cli(rows: list[dict], runs: str, clock_name: str) -> str:
    header = ["model", "API s", "CLI s", "start-up s", "imports s", "CLI - imports s", "CLI/(2 API + imports)",
              "target", "same widths"]
    body = [[r["model"], f"{r['prunekit']['best']:.2f}", f"{c['best']:.2f}", f"{c['startup']:.2f}",
             f"{c['imports']:.2f}", f"{c['best'] - c['imports']:.2f}", f"{c['ratio']:.2f}",
             "ok" if c["ratio"] <= 1 else "MISSED", "yes" if c["same_widths"] else "NO"]
            for r in rows for c in [r.get("cli")] if c is not None]
    notes = ["CLI = python -m prunekit prune model.pt -c config.yaml -o RUN -q in a fresh process (the API's config "
             "plus model.builder and input_shape; the run directory written); start-up = python -m prunekit --help; "
             "imports = python -c 'import prunekit.loop, <builder module>', which any prune of that model pays.",
             f"target: CLI s <= {CLI_TARGET:.0f} x API s + imports s (the start-up a prune of this model cannot "
             "avoid: torch and the builder's module; --help alone imports neither); same widths: the CLI's "
             "manifest.json has the API run's widths."]
    title = f"The command line end to end: {clock_name}-clock seconds, {runs}"
    return "\n".join([title, "", table(header, body, set(range(1, len(header) - 2))), "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="NAME",
                        help=f"subset of {', '.join(MODELS)} (any torchvision classifier name works)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each tool (default 1; best is shown)")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning even when it is installed")
    parser.add_argument("--tp-time-limit", type=float, metavar="SECONDS",
                        help="stop a Torch-Pruning run after this long (its time is then a lower bound)")
    parser.add_argument("--no-cli", action="store_true", help="skip the command line's end-to-end time")
    add_threads_clock_json(parser, "save all results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    global clock, clock_name, threads
    clock = apply_threads_clock(args)
    clock_name, threads = args.clock, args.threads
    use_tp = tp is not None and not args.no_tp

    env = environment(fvcore=True)
    print(f"{environment_line(env)}{' (skipped)' if tp is not None and not use_tp else ''}", flush=True)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name in args.models:
            print(f"  {name} ...", flush=True)
            row = bench_model(name, args.repeats, use_tp, args.tp_time_limit, not args.no_cli)
            pk = row["prunekit"]
            line = f"    prunekit {pk['best']:.2f} s, FLOPs {pk['fvcore_ratio']:.2%}"
            if "cli" in row:
                line += f"; CLI {row['cli']['best']:.2f} s (start-up {row['cli']['startup']:.2f} s)"
            if "tp" in row:
                line += f"; TP {row['tp']['best']:.1f} s ({row['tp']['steps']} steps), FLOPs {row['tp']['fvcore_ratio']:.2%}"
            print(line, flush=True)
            rows.append(row)
    print()
    print(format_results(rows, args.repeats, args.clock))
    env["load_average_after"] = load_average()
    save_json(args.json, {"environment": env, "clock": args.clock, "repeats": args.repeats,
                          "flops_target": FLOPS_TARGET, "speedup_target": SPEEDUP_TARGET, "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
