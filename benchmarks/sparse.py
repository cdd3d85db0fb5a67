"""Sparse training: Top-KAST against global magnitude pruning plus fine-tuning, same budget.

    python benchmarks/sparse.py                                  # densities 0.2, 0.1, 0.05
    python benchmarks/sparse.py --iterations 300 --densities 0.1 --json out/sparse.json

The small CNN (``prunekit.zoo.small_cnn``, 60,688 conv and Linear weights) on a subset of
Fashion-MNIST (the first --train training images, the first --test test images), Adam at lr 1e-3,
batch 64, the built-in trainer's augmentation; each seed (--seeds) sets the initial weights and
the batch order. Every
sparse method gets the same number of optimizer steps (--iterations, N):

- dense: N steps of ordinary training (the reference, density 1);
- topkast (layer) / topkast (global): N steps of Top-KAST from the same initial weights at
  density D (forward, set A) and 2D (backward, set B), ranked within each conv and Linear
  weight (layer: every tensor at D) or over all of them (global: the allocation magnitude
  pruning uses), sets refreshed every --refresh-every steps for the first 3/4 of training,
  then frozen;
- magnitude: N/2 dense steps, one-shot global magnitude pruning to D, N/2 steps of fine-tuning
  with the masks fixed (the same total budget);
- magnitude+ (with --long): the dense model of the first row (N steps), pruned the same way and
  fine-tuned for N more steps: twice the budget, the usual "train, prune, fine-tune" recipe.

The table gives test accuracy, the nonzero conv/Linear weights (and their density), all nonzero
parameters, and the training seconds. Compute is dense with masks in every row: no method here
saves FLOPs in the forward pass. A second table times one Linear weight gradient both ways
Top-KAST computes them: dense then masked to B (what every conv gets), and on B alone with
``torch.sparse.sampled_addmm`` (what Linear layers get), for fc1 and for a wide layer.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import add_threads_clock_json, apply_threads_clock, environment, environment_line, save_json, table  # noqa: E402

from prunekit.config import Sparsity  # noqa: E402
from prunekit.data.datasets import fashion_mnist  # noqa: E402
from prunekit.data.trainer import evaluate, finetune  # noqa: E402
from prunekit.sparse import select_tensors, sparsity_report  # noqa: E402
from prunekit.zoo import small_cnn  # noqa: E402


def _row(method: str, density: float, model, test, seconds: float) -> dict:
    tensors = select_tensors(model, 0.5, 0.5)  # every conv and Linear weight (the density is not used here)
    rep = sparsity_report(model, tensors, method)
    return {"method": method, "density": density, "accuracy": evaluate(model, test),
            "nonzero": rep["overall"]["nonzero"], "weights": rep["overall"]["numel"],
            "weight_density": rep["overall"]["density"], "params_nonzero": rep["parameters"]["nonzero"],
            "params": rep["parameters"]["total"], "seconds": seconds}


def _train(model, train, iterations: int, seed: int, sparsity=None, clock=time.perf_counter):
    started = clock()
    finetune(model, train, iterations, lr=1e-3, seed=seed, show_progress=False, sparsity=sparsity)
    return clock() - started


def run(args, clock, seed: int) -> list[dict]:
    train = fashion_mnist("train", limit=args.train, batch_size=64)
    test = fashion_mnist("test", limit=args.test, batch_size=500)
    n, half = args.iterations, args.iterations // 2
    torch.manual_seed(seed)
    initial = small_cnn()
    rows = []

    def report(row):
        rows.append({**row, "seed": seed})
        print(f"  seed {seed} {row['method']:<16} D={row['density']:<5} accuracy {row['accuracy']:.4f}  nonzero "
              f"{row['nonzero']:>6,}  {row['seconds']:6.1f} s", flush=True)

    dense = copy.deepcopy(initial)
    report(_row("dense", 1.0, dense, test, _train(dense, train, n, seed, clock=clock)))
    dense_half = copy.deepcopy(initial)
    half_seconds = _train(dense_half, train, half, seed, clock=clock)
    for d in args.densities:
        for scope in args.scopes:
            topkast = Sparsity(method="topkast", density=d, scope=scope, refresh_every=args.refresh_every,
                               penalty=args.penalty, iterations=n)
            model = copy.deepcopy(initial)
            report(_row(f"topkast ({scope})", d, model, test, _train(model, train, n, seed, topkast, clock)))
        magnitude = Sparsity(method="magnitude", density=d, iterations=half)
        model = copy.deepcopy(dense_half)
        report(_row("magnitude", d, model, test, half_seconds + _train(model, train, n - half, seed + 1,
                                                                        magnitude, clock)))
        if args.long:
            model = copy.deepcopy(dense)
            report(_row("magnitude+", d, model, test, rows[0]["seconds"] + _train(model, train, n, seed + 1,
                                                                                 magnitude, clock)))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (method, density): the mean over seeds, with the spread of the accuracy."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["density"]), []).append(r)
    out = []
    for (method, density), runs in groups.items():
        acc = torch.tensor([r["accuracy"] for r in runs], dtype=torch.float64)
        out.append({**runs[0], "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()) if len(runs) > 1 else 0.0,
                    "seconds": sum(r["seconds"] for r in runs) / len(runs), "seeds": len(runs)})
    return out


GRADIENT_SHAPES = [(64, 64, 576), (256, 1024, 4096)]  # (batch, out, in): the small CNN's fc1, a wide Linear


def gradient_timing(densities, repeats: int, clock) -> list[dict]:
    """A Linear weight's gradient under Top-KAST: dense GEMM then masked to B (what convs get), against
    the sampled matmul on B only (what Linear layers get); median milliseconds of ``repeats``."""
    from prunekit.sparse import keep_count, top_mask
    from prunekit.sparse.linear import csr_pattern, sampled_weight_grad

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = clock()
            fn()
            times.append(clock() - started)
        return sorted(times)[len(times) // 2] * 1e3

    out = []
    generator = torch.Generator().manual_seed(0)
    for batch, rows, cols in GRADIENT_SHAPES:
        go, x = torch.randn(batch, rows, generator=generator), torch.randn(batch, cols, generator=generator)
        w = torch.randn(rows, cols, generator=generator)
        for b in densities:
            mask = top_mask(w.abs(), keep_count(w.numel(), b))
            pattern = csr_pattern(mask, w.dtype)
            dense = median_ms(lambda: torch.where(mask, go.t() @ x, 0.0))
            sampled = median_ms(lambda: sampled_weight_grad(pattern, go, x))
            out.append({"shape": f"{batch}x{rows}x{cols}", "backward_density": b, "dense_masked_ms": dense,
                        "sampled_ms": sampled})
    return out


def format_gradients(rows: list[dict]) -> str:
    body = [[r["shape"], f"{r['backward_density']:g}", f"{r['dense_masked_ms']:.3f}", f"{r['sampled_ms']:.3f}",
             f"{r['dense_masked_ms'] / r['sampled_ms']:.1f}x"] for r in rows]
    return table(["batch x out x in", "B", "dense + mask ms", "on B only ms", "speed-up"], body, right={1, 2, 3, 4})


def format_rows(rows: list[dict]) -> str:
    header = ["method", "density", "accuracy", "nonzero weights", "nonzero params", "train s"]
    body = [[r["method"], f"{r['density']:g}", f"{r['accuracy']:.4f}" + (f" ± {r['accuracy_std']:.4f}"
                                                                          if r.get("seeds", 1) > 1 else ""),
             f"{r['nonzero']:,} ({r['weight_density']:.3f})", f"{r['params_nonzero']:,}", f"{r['seconds']:.1f}"]
            for r in rows]
    return table(header, body, right={1, 2, 3, 4, 5})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    parser.add_argument("--iterations", type=int, default=400, help="optimizer steps of every method (N)")
    parser.add_argument("--train", type=int, default=10000, help="training images (the first ones)")
    parser.add_argument("--test", type=int, default=2000, help="test images (the first ones)")
    parser.add_argument("--refresh-every", type=int, default=50, help="Top-KAST: steps between set refreshes")
    parser.add_argument("--penalty", type=float, default=1e-4, help="Top-KAST: scale of the exploration loss")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of everything per seed; "
                        "the table shows the mean accuracy (± the standard deviation over seeds)")
    parser.add_argument("--scopes", nargs="+", choices=["layer", "global"], default=["layer", "global"],
                        help="Top-KAST's ranking: per tensor (layer) and/or over all tensors (global)")
    parser.add_argument("--long", action="store_true", help="also magnitude+ (the twice-the-budget recipe)")
    parser.add_argument("--gradients-only", action="store_true", help="only time the Linear weight gradient")
    add_threads_clock_json(parser, "save the rows and the environment here")
    args = parser.parse_args(argv)
    clock = apply_threads_clock(args)
    print(environment_line(environment()), flush=True)
    print(f"small_cnn on Fashion-MNIST: {args.train} train / {args.test} test images, {args.iterations} steps, "
          f"batch 64, seeds {args.seeds}", flush=True)
    rows = [] if args.gradients_only else [row for seed in args.seeds for row in run(args, clock, seed)]
    summary = summarise(rows)
    if rows:
        print()
        print(format_rows(summary))
        print("\nCompute is dense with masks in every row (no FLOPs saved).")
    gradients = gradient_timing([0.4, 0.2, 0.1, 0.02], 20, clock)
    print("\nA Linear weight's gradient: dense then masked to B (convs), or on B only (sampled_addmm, Linear):")
    print(format_gradients(gradients))
    save_json(args.json, {"environment": environment(), "settings": {k: v for k, v in vars(args).items()
                                                                     if k != "json"}, "rows": rows, "summary": summary,
                          "gradients": gradients}, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
