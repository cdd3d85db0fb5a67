"""How much of a FLOPs saving turns into time: pruned models' measured latency, side by side.

    python benchmarks/latency.py                              # all models below
    python benchmarks/latency.py --models resnet50 unet --json out/latency.json

For each model (random weights, seed 0), four models are timed together, interleaved, in
one run (``prunekit.latency.compare_latency``): the original; prunekit at 50% of the FLOPs
(``flops``: L1 norms, 8 steps, no fine-tuning, the classifier or output conv left alone,
``limits.round_to: 1``);
the same with ``limits.round_to: 8`` (``flops/8``); prunekit with ``targets.latency: 0.5``
measured at one thread (``latency``); Torch-Pruning's model at the same FLOPs
(``tp``: MetaPruner, L1, 50 steps of at most 0.9 per layer, stopping at half the MACs); and
the same architecture built thinner by design (``thin``: the width argument its authors
give it, chosen so that the FLOPs come closest to 50%: ``unet(width=...)``,
``mobilenet_v2(width_mult=...)``, ``resnet50(width_per_group=...)``,
``DenseNet(growth_rate, (6, 12, 24, 16), 2 * growth_rate)``). ``thin`` is the
reference for what narrowing gives: every layer narrowed evenly, at widths the architecture was
designed with.

Columns: the FLOPs ratio (fvcore), the latency ratio at one thread and at all of this
machine's cores, and the efficiency, the latency speed-up over the FLOPs speed-up
(``flops ratio / latency ratio``: 1.0 means every saved flop saved its share of time).
Targets: efficiency >= 0.9 at one thread and >= 0.8 at all cores; the latency run within
5% of its target (ratio <= 0.525 at one thread).

``--onnx`` (needs ``onnxruntime``) also exports every model with ``prunekit.export_onnx``
(checked against PyTorch) and times the files with ONNX Runtime the same way, interleaved, at
one thread and at all cores: a deployment runtime that folds each BatchNorm into its conv and
fuses the activations, so the time left is mostly the convolutions the FLOPs count.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from common import environment, environment_line, prunekit, save_json, table, tp
from prunekit.costs import fvcore_counts
from prunekit.latency import compare_latency, time_calls

MODELS = ["resnet50", "mobilenet_v2", "densenet121", "unet", "smp_unet"]
ALL_CORES = torch.get_num_threads()
LATENCY_TARGET = 0.5
TP_STEPS = 50


def build_model(name: str) -> tuple[nn.Module, torch.Tensor, str] | None:
    """The model, its example input and its last layer (left unpruned); None when its package is missing."""
    torch.manual_seed(0)
    if name == "unet":
        from prunekit.zoo import unet

        return unet(width=32).eval(), torch.randn(1, 3, 256, 256), "out"
    if name == "smp_unet":
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            return None
        return smp.Unet("resnet34", encoder_weights=None, classes=2).eval(), torch.randn(1, 3, 256, 256), \
            "segmentation_head.0"
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval()
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return model, torch.randn(1, 3, 224, 224), last


def thin_model(name: str, x: torch.Tensor) -> nn.Module | None:
    """The architecture built narrower by its own width argument, FLOPs closest to half the original's."""
    import torchvision

    from prunekit.zoo import unet

    builders = {"unet": (lambda w: unet(width=w), range(16, 33)),
                "mobilenet_v2": (lambda w: torchvision.models.mobilenet_v2(width_mult=w / 100), range(40, 101, 5)),
                "resnet50": (lambda w: torchvision.models.resnet50(width_per_group=w), range(16, 65, 4)),
                "densenet121": (lambda w: torchvision.models.DenseNet(w, (6, 12, 24, 16), 2 * w), range(12, 33, 2))}
    if name not in builders:
        return None
    build, widths = builders[name]
    flops0 = prunekit.count_flops_params(build(widths[-1]).eval(), x)["flops"]
    torch.manual_seed(0)
    models = [build(w).eval() for w in widths]
    return min(models, key=lambda m: abs(prunekit.count_flops_params(m, x)["flops"] / flops0 - 0.5))


def config(last: str, **changes) -> dict:
    cfg = {"targets": {"flops": 0.5, "params": 1.0}, "importance": {"method": "l1"}, "schedule": {"steps": 8},
           "limits": {"default": 0.9, "layers": {last: 0}, "round_to": 1}}
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section] = {**cfg.get(section, {}), name: value}
    return cfg


def run_tp(model: nn.Module, x: torch.Tensor, last: str) -> nn.Module:
    model = copy.deepcopy(model)
    base, _ = tp.utils.count_ops_and_params(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      iterative_steps=TP_STEPS, pruning_ratio=0.9,
                                      ignored_layers=[model.get_submodule(last)])
        for _ in range(TP_STEPS):
            pruner.step()
            if tp.utils.count_ops_and_params(model, x)[0] <= 0.5 * base:
                break
    return model.eval()


def onnxruntime_latency(models: dict[str, nn.Module], x: torch.Tensor, thread_counts: tuple[int, ...],
                        repeats: int) -> dict[int, dict]:
    """Each model exported once (checked against PyTorch) and its ONNX Runtime session timed, interleaved,
    at each thread count."""
    import onnxruntime

    from prunekit.export import _feeds, _session, export_onnx

    timed = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: Path(tmp) / f"{k.replace('/', '_')}.onnx" for k in models}
        for k, m in models.items():
            export_onnx(m, x, paths[k], repeats=0, exporter="torchscript", dynamic_batch=False)
        for threads in thread_counts:
            runs = {}
            for k, path in paths.items():
                session = _session(onnxruntime, path, threads)
                runs[k] = (lambda s, f: lambda: s.run(None, f))(session, _feeds(session, (x,)))
            timed[threads] = time_calls(runs, "cpu", threads, repeats, warmup=3)
    return timed


def bench_model(name: str, repeats: int, use_tp: bool, onnx: bool = False) -> dict | None:
    built = build_model(name)
    if built is None:
        return None
    model, x, last = built
    variants: dict[str, nn.Module] = {}
    seconds: dict[str, float] = {}
    runs = {"flops": config(last), "flops/8": config(last, limits__round_to=8),
            "latency": config(last, targets__latency=LATENCY_TARGET, targets__flops=1.0, latency__threads=1)}
    for label, cfg in runs.items():
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        result = prunekit.prune(model, x, cfg, progress=False)
        torch.set_num_threads(ALL_CORES)
        seconds[label] = time.perf_counter() - t0
        variants[label] = result.model
        print(f"  {name} {label}: pruned in {seconds[label]:.1f} s ({result.message})", flush=True)
    if use_tp:
        t0 = time.perf_counter()
        variants["tp"] = run_tp(model, x, last)
        seconds["tp"] = time.perf_counter() - t0
    thin = thin_model(name, x)
    if thin is not None:
        variants["thin"], seconds["thin"] = thin, 0.0
    flops0 = fvcore_counts(model, x)[0]
    flops = {k: fvcore_counts(m, x)[0] / flops0 for k, m in variants.items()}
    timed = {"original": model, **variants}
    one = compare_latency(timed, x, threads=1, repeats=repeats)
    every = compare_latency(timed, x, threads=ALL_CORES, repeats=repeats)
    rows = {}
    for k in variants:
        lat1, latn = one[k].median / one["original"].median, every[k].median / every["original"].median
        rows[k] = {"flops_ratio": flops[k], "latency_1": lat1, "latency_all": latn,
                   "efficiency_1": flops[k] / lat1, "efficiency_all": flops[k] / latn, "seconds": seconds[k]}
    original_ms = {"1": one["original"].median * 1e3, "all": every["original"].median * 1e3}
    if onnx:
        by_threads = onnxruntime_latency(timed, x, (1, ALL_CORES), repeats)
        for threads, key in ((1, "1"), (ALL_CORES, "all")):
            timed_ort = by_threads[threads]
            original_ms[f"ort_{key}"] = timed_ort["original"].median * 1e3
            for k in variants:
                ratio = timed_ort[k].median / timed_ort["original"].median
                rows[k].update({f"ort_latency_{key}": ratio, f"ort_efficiency_{key}": flops[k] / ratio})
    return {"model": name, "input": list(x.shape), "original_ms": original_ms, "variants": rows}


def format_results(results: list[dict]) -> str:
    onnx = any("ort_latency_1" in v for r in results for v in r["variants"].values())
    header = ["model", "variant", "FLOPs", "latency 1t", "eff 1t", f"latency {ALL_CORES}t", f"eff {ALL_CORES}t"]
    if onnx:
        header += ["ORT 1t", "ORT eff 1t", f"ORT {ALL_CORES}t", f"ORT eff {ALL_CORES}t"]
    rows = []
    for r in results:
        for k, v in r["variants"].items():
            row = [r["model"], k, f"{v['flops_ratio']:.1%}", f"{v['latency_1']:.1%}", f"{v['efficiency_1']:.2f}",
                   f"{v['latency_all']:.1%}", f"{v['efficiency_all']:.2f}"]
            if onnx:
                row += [f"{v['ort_latency_1']:.1%}", f"{v['ort_efficiency_1']:.2f}", f"{v['ort_latency_all']:.1%}",
                        f"{v['ort_efficiency_all']:.2f}"] if "ort_latency_1" in v else ["-"] * 4
            rows.append(row + [f"{v['seconds']:.1f}"])
    return table(header + ["prune s"], rows, right=set(range(2, len(header) + 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model and thread count")
    parser.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out")
    parser.add_argument("--onnx", action="store_true",
                        help="also time every model exported to ONNX under ONNX Runtime (needs onnxruntime)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="save all results here")
    args = parser.parse_args(argv)
    env = environment(fvcore=True)
    print(environment_line(env), flush=True)
    use_tp = tp is not None and not args.no_tp
    results = [r for r in (bench_model(m, args.repeats, use_tp, args.onnx) for m in args.models) if r]
    print()
    print(format_results(results))
    print(f"\nlatency = pruned / original, median of {args.repeats} interleaved runs; eff = FLOPs ratio / latency "
          f"ratio; targets: eff >= 0.9 at 1 thread, >= 0.8 at {ALL_CORES}; 'latency' run <= "
          f"{LATENCY_TARGET * 1.05:.3f} at 1 thread.")
    save_json(args.json, {"environment": env, "repeats": args.repeats, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
