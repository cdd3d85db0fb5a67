"""The built-in demo: train the reference U-Net on real nuclei tiles, prune it to
half its FLOPs with IPAD, fine-tune, and compare FLOPs, parameters and IoU.

It writes what a user's own run would: the trained weights (unet.pt), the
config (config.yaml, rerunnable with `prunekit prune`), and the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .costs import count_flops_params
from .data.datasets import nuclei_tiles
from .files import atomic_save_torch, atomic_write_text
from .loop import prune
from .reports.console import threads_text
from .data.trainer import evaluate, finetune
from .yamlfile import read_yaml
from .zoo import unet

# the demo is `configs/unet.yaml`: the one place its settings live
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "unet.yaml"


def demo_config() -> dict:
    """The shipped U-Net config as data."""
    return read_yaml(CONFIG)


def run_demo(out_dir="out/demo", train_iterations: int = 200, force: bool = True, progress: bool = True,
             echo=print) -> dict:
    """Train, prune, fine-tune, report. Returns the before/after numbers.

    With ``progress``, each piece of work reports on stderr: bars on a terminal, plain lines when
    piped or logged (see :mod:`prunekit.progress`).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = demo_config()
    tile = config["input_shape"][-1]
    train = nuclei_tiles("train", tile=tile, batch_size=8)
    test = nuclei_tiles("test", tile=tile, batch_size=8)
    model = unet(**config["model"]["kwargs"])
    echo(f"Training the reference U-Net on 48 nuclei tiles of {tile}x{tile} ({train_iterations} iterations)...")
    finetune(model, train, train_iterations, lr=2e-3, seed=0, show_progress=progress, description="train")
    example = torch.zeros(config["input_shape"])
    before = {**count_flops_params(model, example), "iou": evaluate(model, test)}
    atomic_save_torch(model.state_dict(), out / "unet.pt")
    atomic_write_text(out / "config.yaml", CONFIG.read_text())  # comments and all
    echo("Pruning to 50% of the FLOPs with IPAD (4 steps, fine-tuning after each)...")
    result = prune(model, example, config, run_dir=out / "run", force=force, progress=progress)
    after = {**result.final, "iou": evaluate(result.model, test)}
    seconds = time.perf_counter() - started
    echo("")
    echo(f"{'':12}{'before':>14}{'after':>14}{'ratio':>9}")
    for key, label in (("flops", "FLOPs"), ("params", "parameters")):
        echo(f"{label:12}{before[key]:>14,}{after[key]:>14,}{after[key] / before[key]:>9.1%}")
    if result.latency:
        lat = result.latency
        echo(f"{'latency':12}{lat['original_seconds'] * 1e3:>11.2f} ms{lat['pruned_seconds'] * 1e3:>11.2f} ms"
             f"{lat['ratio']:>9.1%}   ({lat['device']}, {threads_text(lat['threads'])})")
    echo(f"{'IoU (test)':12}{before['iou']:>14.3f}{after['iou']:>14.3f}")
    echo(f"\nDone in {seconds:.0f} s. Run directory: {out / 'run'} (report.md, trajectory.png, widths.png, model.pt,"
         f" manifest.json).\nSee it with: prunekit report {out / 'run'}\n"
         f"Rerun with: prunekit prune {out / 'unet.pt'} --config {out / 'config.yaml'} -o {out / 'run2'}")
    return {"before": before, "after": after, "seconds": seconds, "targets_met": result.targets_met}
