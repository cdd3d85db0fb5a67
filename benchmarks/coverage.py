"""Which real third-party models prunekit can prune, next to Torch-Pruning: timm CNNs and MONAI networks.

    python benchmarks/coverage.py                                  # every model of tests/test_real_models.py
    python benchmarks/coverage.py --family monai --json out/coverage.json
    python benchmarks/coverage.py --models resnet18 UNet_3d --no-tp

The models, their inputs and their random weights are those of the slow
sweep ``tests/test_real_models.py`` (timm ``create_model(name,
pretrained=False)`` at 1x3x64x64 unless the sweep says otherwise; MONAI
networks with small widths at 1x1x64x64 and 1x1x32x32x32). A model counts as
pruned by a tool when its graph was built, the cut was made, the pruned model
has fewer parameters, and it runs in eval mode with the original's output
structure and shapes.

- prunekit: ``build_graph``, then about half of the prunable units
  (``helpers.pick_units(g, 0.5, seed=0)``, the sweep's choice) cut with
  ``surgery.apply_removal``. Also reported: the modules traced as opaque
  leaves (``g.fallbacks``: how many, why, how many channels each pinned) and
  the share of the producers' output channels that may be removed at all.
- Torch-Pruning (optional, ``pip install --no-deps torch-pruning==1.6.1``):
  ``MetaPruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5,
  ignored_layers=[output layers])`` and one ``step()``, as graph_speed.py
  runs it. The output layers are the convs / linears whose output is a model
  output (the classifier, a segmentation head, every deep-supervision head),
  or else the last one to run.

Each tool gets its own deep copy and a time limit per model (``--time-limit``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from common import environment, environment_line, load_average, params, prunekit, save_json, table, tp

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import test_real_models as sweep  # noqa: E402  (the model lists and builders)
from helpers import assert_same_structure, pick_units, tensor_leaves, time_limit  # noqa: E402
from prunekit.surgery import apply_removal  # noqa: E402

FAMILIES = {"timm": sweep.TIMM, "monai": sweep.MONAI}
PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


class NotPruned(Exception):
    """The tool ran without error but did not prune (nothing prunable, nothing removed)."""


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = " ".join((str(exc) if isinstance(exc, NotPruned) else f"{type(exc).__name__}: {exc}").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def where(exc: BaseException) -> str:
    """The innermost frame of the traceback, as file:line (site-packages paths shortened)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames or isinstance(exc, NotPruned):
        return ""
    f = frames[-1]
    path = f.filename.split("site-packages/")[-1].replace(str(Path(__file__).resolve().parents[1]) + "/", "")
    return f"{path}:{f.lineno}"


def output_layers(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The convs / linears whose outputs are model outputs; else the last conv / linear to run."""
    ran: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append((m, o)))
             for m in model.modules() if isinstance(m, PRODUCERS)]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    outputs = {id(t) for t in tensor_leaves(out)}
    found = list(dict.fromkeys(m for m, o in ran if isinstance(o, torch.Tensor) and id(o) in outputs))
    if found or not ran:
        return found
    return [ran[-1][0]]


# -- one model, each tool ---------------------------------------------------------------------------


def run_prunekit(model: nn.Module, x: torch.Tensor, expected, limit: int) -> dict:
    row: dict = {"pruned": False, "stage": "graph"}
    t0 = time.perf_counter()
    try:
        with time_limit(limit, "prunekit"):
            graph = prunekit.build_graph(model, x)
            row["fallbacks"] = [{"module": f.module, "type": f.type, "reason": f.reason, "location": f.location,
                                 "pinned_channels": graph.fallback_cost(f)} for f in graph.fallbacks]
            channels = sum(len(u) for u in graph.producers.values())
            prunable = sum(int((~graph.pinned[u]).sum()) for u in graph.producers.values())
            row["channels"], row["prunable_channels"] = channels, prunable
            row["prunable_fraction"] = prunable / channels if channels else 0.0
            row["stage"] = "cut"
            units = pick_units(graph, 0.5, 0)
            if not units:
                raise NotPruned("nothing prunable: every channel is pinned")
            mask = graph.removal_mask(units)
            pruned = apply_removal(model, graph, mask).eval()
            row["removed_units"] = len(units)
            row["stage"] = "run"
            with torch.no_grad():
                assert_same_structure(pruned(x), expected)
            row["params_kept"] = params(pruned) / params(model)
            if params(pruned) >= params(model):
                raise NotPruned("the cut removed no parameters")
            row["pruned"], row["stage"] = True, "done"
    except Exception as exc:  # noqa: BLE001 -- every failure is a result here
        row["error"], row["where"] = short_error(exc), where(exc)
    row["seconds"] = time.perf_counter() - t0
    return row


def run_tp(model: nn.Module, x: torch.Tensor, expected, limit: int) -> dict:
    row: dict = {"pruned": False, "stage": "graph"}
    t0 = time.perf_counter()
    try:
        with time_limit(limit, "Torch-Pruning"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ignored = output_layers(model, x)
            before = params(model)
            pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=0.5, ignored_layers=ignored)
            row["stage"] = "cut"
            pruner.step()
            row["stage"] = "run"
            model.eval()
            with torch.no_grad():
                assert_same_structure(model(x), expected)
            row["params_kept"] = params(model) / before
            if params(model) >= before:
                raise NotPruned("the step removed no parameters")
            row["pruned"], row["stage"] = True, "done"
    except Exception as exc:  # noqa: BLE001
        row["error"], row["where"] = short_error(exc), where(exc)
    row["seconds"] = time.perf_counter() - t0
    return row


def bench_model(name: str, use_tp: bool, limit: int) -> dict:
    family = "monai" if name in sweep.MONAI else "timm"
    row: dict = {"model": name, "family": family}
    try:
        model, x, _ = sweep.build(name)
        with torch.no_grad():
            expected = model(x)
    except Exception as exc:  # noqa: BLE001
        row["build_error"] = short_error(exc)
        return row
    row["input"], row["params"] = list(x.shape), params(model)
    row["prunekit"] = run_prunekit(copy.deepcopy(model), x, expected, limit)
    if use_tp:
        row["tp"] = run_tp(copy.deepcopy(model), x, expected, limit)
    return row


# -- printing ---------------------------------------------------------------------------------------------


def _status(r: dict | None) -> str:
    if r is None:
        return "-"
    return "yes" if r["pruned"] else f"no ({r['stage']})"


def format_results(rows: list[dict]) -> str:
    have_tp = any("tp" in r for r in rows)
    header = ["model", "family", "input", "pk pruned", "fallbacks", "prunable", "pk params kept", "pk s"]
    if have_tp:
        header += ["TP pruned", "TP params kept", "TP s"]
    body = []
    for r in rows:
        if "build_error" in r:
            body.append([r["model"], r["family"], "-", "model does not build"] + ["-"] * (len(header) - 4))
            continue
        pk = r["prunekit"]
        cells = [r["model"], r["family"], "x".join(map(str, r["input"])), _status(pk),
                 str(len(pk["fallbacks"])) if "fallbacks" in pk else "-",
                 f"{pk['prunable_fraction']:.1%}" if "prunable_fraction" in pk else "-",
                 f"{pk['params_kept']:.1%}" if "params_kept" in pk else "-", f"{pk['seconds']:.1f}"]
        if have_tp:
            t = r.get("tp")
            cells += [_status(t), f"{t['params_kept']:.1%}" if t and "params_kept" in t else "-",
                      f"{t['seconds']:.1f}" if t else "-"]
        body.append(cells)
    lines = [table(header, body, {4, 5, 6, 7, 9, 10} if have_tp else {4, 5, 6, 7})]

    failures = [(r["model"], who, res) for r in rows for who, key in (("prunekit", "prunekit"), ("TP", "tp"))
                if (res := r.get(key)) and not res["pruned"]]
    if failures:
        lines += ["", "Failures (stage: graph = building the graph / pruner, cut = choosing and cutting, "
                      "run = running the pruned model):"]
        lines += [f"  {m:28s} {who:8s} [{res['stage']}] {res.get('error', '')}"
                  + (f"  ({res['where']})" if res.get("where") else "") for m, who, res in failures]
    leaves = [(r["model"], f) for r in rows for f in r.get("prunekit", {}).get("fallbacks", [])]
    if leaves:
        lines += ["", "prunekit fallbacks (modules traced as opaque leaves; their channels are pinned):"]
        lines += [f"  {m:28s} '{f['module']}' ({f['type']}): {' '.join(f['reason'].split())[:110]}"
                  f" [{f['pinned_channels']} channels]" for m, f in leaves]
    return "\n".join(lines)


def totals(rows: list[dict], use_tp: bool) -> dict:
    out = {"models": len(rows), "prunekit": sum(r.get("prunekit", {}).get("pruned", False) for r in rows)}
    out["prunekit_with_fallbacks"] = sum(bool(r.get("prunekit", {}).get("fallbacks")) for r in rows)
    if use_tp:
        out["tp"] = sum(r.get("tp", {}).get("pruned", False) for r in rows)
    for family in FAMILIES:
        sub = [r for r in rows if r["family"] == family]
        if sub:
            out[family] = {"models": len(sub), "prunekit": sum(r.get("prunekit", {}).get("pruned", False) for r in sub)}
            if use_tp:
                out[family]["tp"] = sum(r.get("tp", {}).get("pruned", False) for r in sub)
    return out


def format_totals(t: dict) -> str:
    line = f"prunekit prunes {t['prunekit']}/{t['models']}"
    if "tp" in t:
        line += f", TP prunes {t['tp']}/{t['models']}"
    per = [f"{f}: prunekit {t[f]['prunekit']}/{t[f]['models']}" + (f", TP {t[f]['tp']}/{t[f]['models']}"
                                                                    if "tp" in t[f] else "")
           for f in FAMILIES if f in t]
    return line + (f"  ({'; '.join(per)})" if per else "") + \
        f"; {t['prunekit_with_fallbacks']} models traced with fallbacks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="a subset of the sweep's models (timm names, MONAI as Net_2d / Net_3d)")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="only timm or only MONAI models")
    parser.add_argument("--no-tp", action="store_true", help="prunekit only")
    parser.add_argument("--time-limit", type=int, default=60, metavar="SECONDS",
                        help="per model and tool (default 60; the slowest prunekit case takes about 10 s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="save every row here")
    args = parser.parse_args(argv)
    names = args.models or sweep.TIMM + sweep.MONAI
    unknown = [n for n in names if n not in sweep.TIMM + sweep.MONAI]
    if unknown:
        parser.error(f"not in tests/test_real_models.py: {', '.join(unknown)}")
    if args.family:
        names = [n for n in names if n in FAMILIES[args.family]]
    if args.threads:
        torch.set_num_threads(args.threads)
    use_tp = tp is not None and not args.no_tp

    env = environment()
    for package in ("timm", "monai"):
        env[package] = __import__(package).__version__
    print(environment_line(env) + f", timm {env['timm']}, MONAI {env['monai']}", flush=True)
    if tp is None and not args.no_tp:
        print("Torch-Pruning is not installed (pip install --no-deps torch-pruning==1.6.1): prunekit only.")
    rows = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(names, 1):
            row = bench_model(name, use_tp, args.time_limit)
            rows.append(row)
            pk, t = row.get("prunekit", {}), row.get("tp")
            print(f"  [{i}/{len(names)}] {name}: prunekit {_status(pk) if pk else 'model does not build'}"
                  + (f", TP {_status(t)}" if t else ""), flush=True)
    print()
    print(format_results(rows))
    summary = totals(rows, use_tp)
    print()
    print(format_totals(summary))
    print(f"({time.perf_counter() - t0:.0f} s)")
    env["load_average_after"] = load_average()
    save_json(args.json, {"environment": env, "time_limit": args.time_limit, "totals": summary, "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
