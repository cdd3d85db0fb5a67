"""The built-in demo: train the reference U-Net on real nuclei tiles, prune it to
half its FLOPs with IPAD, fine-tune, and compare FLOPs, parameters and IoU.

It writes what a user's own run would: the trained weights (unet.pt), the
config (config.yaml, rerunnable with `prunekit prune`), and the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from .costs import count_flops_params
from .datasets import nuclei_tiles
from .files import atomic_save_torch, atomic_write_text
from .pruner import prune
from .trainer import evaluate, finetune
from .zoo import unet

UNET_KWARGS = {"in_channels": 1, "num_classes": 2, "width": 8, "depth": 3}
TILE = 64  # 48 training and 16 test tiles of 64x64 from the 512x512 image
NUCLEI = "prunekit.datasets:nuclei_tiles"


def demo_config(train_iterations: int = 20, final_iterations: int = 60) -> dict:
    return {
        "model": {"builder": "prunekit.zoo:unet", "kwargs": dict(UNET_KWARGS)},
        "input_shape": [1, 1, TILE, TILE],
        "targets": {"flops": 0.5, "params": 1.0, "stop_when": "both", "priority": "flops"},
        "importance": {"method": "ipad", "norm": 1, "omega": 0.0},
        # the last decoder block holds the few, sparse foreground detectors: IPAD's deviation
        # criterion rates them low, so a limit keeps most of them
        "limits": {"default": 0.75, "layers": {"out": 0.0, "dec1.*": 0.25}, "round_to": 1},
        "schedule": {"steps": 4,
                     "finetune": {"iterations": train_iterations, "lr": 1e-3},
                     "final_finetune": {"iterations": final_iterations, "lr": 5e-4}},
        "data": {"calibration": {"factory": NUCLEI, "kwargs": {"split": "train", "tile": TILE, "batch_size": 8}},
                 "train": {"factory": NUCLEI, "kwargs": {"split": "train", "tile": TILE, "batch_size": 8}},
                 "val": {"factory": NUCLEI, "kwargs": {"split": "test", "tile": TILE, "batch_size": 8}}},
        "keep_best": 3,
        "seed": 0,
    }


def run_demo(out_dir="out/demo", train_iterations: int = 200, force: bool = True, progress: bool = True,
             echo=print) -> dict:
    """Train, prune, fine-tune, report. Returns the before/after numbers."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train = nuclei_tiles("train", tile=TILE, batch_size=8)
    test = nuclei_tiles("test", tile=TILE, batch_size=8)
    model = unet(**UNET_KWARGS)
    echo(f"Training the reference U-Net on 48 nuclei tiles of {TILE}x{TILE} ({train_iterations} iterations)...")
    finetune(model, train, train_iterations, lr=2e-3, seed=0, show_progress=progress, description="train")
    example = torch.zeros(1, 1, TILE, TILE)
    before = {**count_flops_params(model, example), "iou": evaluate(model, test)}
    atomic_save_torch(model.state_dict(), out / "unet.pt")
    config = demo_config()
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    echo("Pruning to 50% of the FLOPs with IPAD (4 steps, fine-tuning after each)...")
    result = prune(model, example, config, run_dir=out / "run", force=force, progress=progress)
    after = {**result.final, "iou": evaluate(result.model, test)}
    seconds = time.perf_counter() - started
    echo("")
    echo(f"{'':12}{'before':>14}{'after':>14}{'ratio':>9}")
    for key, label in (("flops", "FLOPs"), ("params", "parameters")):
        echo(f"{label:12}{before[key]:>14,}{after[key]:>14,}{after[key] / before[key]:>9.1%}")
    echo(f"{'IoU (test)':12}{before['iou']:>14.3f}{after['iou']:>14.3f}")
    echo(f"\nDone in {seconds:.0f} s. Run directory: {out / 'run'} (report.md, model.pt, manifest.json);"
         f" rerun with: prunekit prune {out / 'unet.pt'} --config {out / 'config.yaml'} -o {out / 'run2'}")
    return {"before": before, "after": after, "seconds": seconds, "targets_met": result.targets_met}
