"""Peak memory of a whole prune, in multiples of the model's own size.

    python benchmarks/memory.py                                   # densenet201, API without and with a run directory
    python benchmarks/memory.py --models densenet201 resnet50 --modes api --json out/memory.json

Each measurement runs in a fresh Python process (one torch thread): it builds the model
(torchvision, random weights, seed 0, eval mode, 1x3x224x224 example), reads its resident memory
(the baseline: Python, torch and the loaded model), resets the high-water mark, runs
``prunekit.prune`` with flops_target's config (50% of the FLOPs, L1 norms, 8 steps, no
fine-tuning) and reads the high-water mark. The table gives the peak above the baseline in
multiples of the model's size (the bytes of its state_dict); the target is at most 2x.

Modes: ``api`` is ``prunekit.prune(model, x, config)``, everything in memory; ``run_dir``
also writes a run directory (a checkpoint after every step, then model.pt, the reports, the
plots and the report's latency row), as ``prunekit prune`` does.

The high-water mark is ``VmHWM`` of ``/proc/self/status``, reset by writing 5 to
``/proc/self/clear_refs`` (Linux); elsewhere it is ``ru_maxrss``, which also counts the
model's building, so the peak can only be overstated there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import add_threads_clock_json, environment, environment_line, save_json, table  # noqa: E402
MODELS = ["densenet201"]
MODES = ["api", "run_dir"]
TARGET = 2.0  # peak above the loaded model, in model sizes


# -- the measuring process -------------------------------------------------------------


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status("VmHWM") is not None
    except OSError:
        return False


def measure(name: str, mode: str, threads: int = 1) -> dict:
    """One prune of ``name`` in this process; run only in a fresh one (see :func:`child`)."""
    import torch

    from flops_target import build_model, prunekit_config
    import prunekit

    torch.set_num_threads(threads)
    model, x, last = build_model(name)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    config = prunekit_config(last)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run" if mode == "run_dir" else None
        gc.collect()
        reset = _reset_peak()
        baseline = _status("VmRSS") if reset else _max_rss()
        started = time.process_time()
        result = prunekit.prune(model, x, config, progress=False, run_dir=run_dir)
        seconds = time.process_time() - started
        peak = _status("VmHWM") if reset else _max_rss()
        checkpoint = (run_dir / "checkpoint.pt").stat().st_size if run_dir is not None else None
    pruned_bytes = sum(t.numel() * t.element_size() for t in result.model.state_dict().values())
    return {"model": name, "mode": mode, "model_bytes": model_bytes, "pruned_bytes": pruned_bytes,
            "baseline_rss": baseline, "peak_rss": peak, "extra": (peak - baseline) / model_bytes,
            "checkpoint_bytes": checkpoint, "cpu_seconds": seconds, "high_water": "VmHWM" if reset else "ru_maxrss",
            "flops_ratio": result.final["flops"] / result.original["flops"]}


def child(name: str, mode: str, threads: int) -> dict:
    """:func:`measure` in a fresh interpreter, so nothing an earlier measurement left counts."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        [str(HERE), str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    code = f"import json, memory; print(json.dumps(memory.measure({name!r}, {mode!r}, {threads!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {name} ({mode}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table --------------------------------------------------------------------------


def format_results(rows: list[dict], threads: int) -> str:
    mib = 2 ** 20
    header = ["model", "mode", "model MiB", "baseline MiB", "peak MiB", "peak - baseline", "target",
              "checkpoint", "cpu s"]
    body = []
    for r in rows:
        checkpoint = "" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes'] / r['pruned_bytes']:.2f}x"
        body.append([r["model"], r["mode"], f"{r['model_bytes'] / mib:.1f}", f"{r['baseline_rss'] / mib:.0f}",
                     f"{r['peak_rss'] / mib:.0f}", f"{r['extra']:.2f}x model",
                     ("ok" if r["extra"] <= TARGET else "MISSED") if r["mode"] == "api" else "-",
                     checkpoint, f"{r['cpu_seconds']:.1f}"])
    notes = [f"peak - baseline: the resident-memory high-water mark during prunekit.prune above the process with "
             f"the model loaded, in multiples of the model's state_dict bytes (best of the runs); target <= "
             f"{TARGET:.0f}x for the api mode.",
             f"config: flops_target's (50% FLOPs, l1, 8 steps, no fine-tuning); {threads} torch thread(s); a fresh "
             "process per run; cpu s: the prune's CPU seconds.",
             "checkpoint: the run directory's checkpoint.pt after the last step, in multiples of the pruned model's "
             "state_dict bytes."]
    return "\n".join(["Peak memory of prunekit.prune", "", table(header, body, {2, 3, 4, 5, 7, 8}), "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="NAME", help="torchvision classifiers or unet")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per measurement (the lowest peak "
                                                                "is shown)")
    add_threads_clock_json(parser, "save all results here")  # --clock is accepted; CPU seconds are shown
    args = parser.parse_args(argv)
    threads = args.threads or 1
    print(environment_line({**environment(), "threads": threads}), flush=True)
    rows = []
    for name in args.models:
        for mode in args.modes:
            runs = [child(name, mode, threads) for _ in range(max(1, args.repeats))]
            best = min(runs, key=lambda r: r["extra"])
            print(f"  {name} {mode}: {best['extra']:.2f}x the model above the baseline", flush=True)
            rows.append({**best, "runs": [r["extra"] for r in runs]})
    print()
    print(format_results(rows, threads))
    save_json(args.json, {"environment": environment(), "threads": threads, "target": TARGET, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
