"""What prunekit's benchmarks share: imports, clocks and threads, the environment line, tables, JSON output.

Imported as ``common``: ``benchmarks/`` is on ``sys.path`` when a benchmark runs as a script, and
``benchmarks/run.py`` puts it there too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import prunekit
except ImportError:  # run from a checkout without an editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import prunekit

try:
    import torch_pruning as tp
except ImportError:
    tp = None

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# -- arguments -----------------------------------------------------------------------


def add_threads_clock_json(parser: argparse.ArgumentParser, json_help: str) -> None:
    """``--threads``, ``--clock`` and ``--json FILE``, in that order."""
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: time.perf_counter (default); cpu: process CPU time, steadier when other "
                             "jobs share the machine (use with --threads 1)")
    parser.add_argument("--json", type=Path, metavar="FILE", help=json_help)


def apply_threads_clock(args: argparse.Namespace):
    """Set torch's threads from ``--threads`` (when given); the clock ``--clock`` names."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return CLOCKS[args.clock]


# -- environment -----------------------------------------------------------------------


def dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)  # torch_pruning.__version__ still says 1.6.0 in the 1.6.1 wheel
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(fvcore: bool = False) -> dict:
    """Versions, threads and machine; the fvcore version after Torch-Pruning's when ``fvcore``."""
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_pruning": dist_version("torch-pruning") if tp is not None else None}
    if fvcore:
        env["fvcore"] = dist_version("fvcore")
    env.update({"prunekit": prunekit.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": load_average()})
    return env


def environment_line(env: dict) -> str:
    """The line every benchmark starts with: torch, threads, CPUs, load, prunekit, Torch-Pruning."""
    return (f"torch {env['torch']}, {env['threads']} threads on {env['cpus']} CPUs (load {env['load_average']}), "
            f"prunekit {env['prunekit']}, Torch-Pruning {env['torch_pruning'] or 'not installed'}")


# -- models ----------------------------------------------------------------------------


def check_runs(original: nn.Module, pruned: nn.Module, x: torch.Tensor, who: str) -> None:
    pruned.eval()
    with torch.no_grad():
        want, got = original(x), pruned(x)
    if got.shape != want.shape:
        raise RuntimeError(f"{who}: pruned model returns {tuple(got.shape)}, the original {tuple(want.shape)}")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- output ----------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def save_json(path: Path | None, data: dict, **dumps_kwargs) -> None:
    """Write ``data`` to ``path`` (indented; nothing when ``path`` is None) and say so."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, **dumps_kwargs))
        print(f"\nsaved {path}")
