"""The same prune with fine-tuning on 1 and on N ranks (torchrun): wall time and validation metric side by side.

    python benchmarks/distributed.py                       # 1 and 2 ranks; CPU (gloo), or one GPU per rank (NCCL)
    python benchmarks/distributed.py --ranks 1 2 4 --iterations 40 --json out/distributed.json

Each run is ``torchrun --nproc-per-node N -m prunekit prune unet.pt --config distributed.yaml -o RUN -q``:
the reference U-Net (``prunekit.zoo:unet``, width 8, depth 3, 1 x 64 x 64 inputs), IPAD, 2 steps to
50% of the FLOPs, ``--iterations`` fine-tuning iterations after every cut and at the end, on synthetic
segmentation tiles (bright discs on noise; :func:`tiles`). The global batch is the same for every rank
count (``--batch`` images, ``--batch / N`` per rank), so every run trains on the same images in the
same number of iterations; only how the work is split changes. The metric is the validation IoU the
run reports for its best model (the same data for every run).

On the CPU every rank gets ``--threads`` torch threads (default 1), so N ranks use N cores; on a
machine with GPUs ``device: auto`` gives rank r the GPU r. The metric differs a little between rank
counts: each rank's BatchNorm normalises its own share of the batch, and the Dice term of the loss
is taken per rank (DDP averages the gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import environment, environment_line, prunekit, save_json, table

HERE = Path(__file__).resolve().parent
SIZE = 64


def tiles(n: int = 8, batch: int = 8, seed: int = 0):
    """``n`` batches of ``batch`` 1 x 64 x 64 noisy tiles with 1 to 3 bright discs each, and their masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    out = []
    for _ in range(n):
        masks = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
        for i in range(batch):
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                cy, cx = torch.randint(8, SIZE - 8, (2,), generator=g).tolist()
                r = int(torch.randint(4, 10, (), generator=g))
                masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        images = 0.6 * masks[:, None].float() + 0.4 * torch.rand(batch, 1, SIZE, SIZE, generator=g)
        out.append((images, masks))
    return out


def config(batch: int, iterations: int, device: str) -> dict:
    return {
        "model": {"builder": "prunekit.zoo:unet", "kwargs": {"in_channels": 1, "num_classes": 2, "width": 8,
                                                             "depth": 3}},
        "input_shape": [1, 1, SIZE, SIZE],
        "targets": {"flops": 0.5},
        "schedule": {"steps": 2, "finetune": {"iterations": iterations, "lr": 0.003},
                     "final_finetune": {"iterations": iterations, "lr": 0.003}},
        "importance": {"method": "ipad"},
        "limits": {"default": 0.7},
        "data": {"calibration": {"factory": "distributed:tiles", "kwargs": {"n": 8, "batch": 4, "seed": 1}},
                 "train": {"factory": "distributed:tiles", "kwargs": {"n": 16, "batch": batch, "seed": 2}},
                 "val": {"factory": "distributed:tiles", "kwargs": {"n": 4, "batch": 8, "seed": 3}}},
        "device": device, "seed": 0,
    }


def pretrained(path: Path, iterations: int) -> None:
    """The U-Net trained a little on the tiles, so fine-tuning after a cut has something to recover."""
    from prunekit.data.trainer import finetune
    from prunekit.zoo import unet

    torch.manual_seed(0)
    model = unet(in_channels=1, num_classes=2, width=8, depth=3)
    finetune(model, tiles(n=16, batch=8, seed=2), iterations, lr=0.003, show_progress=False)
    torch.save(model.state_dict(), path)


def run(ranks: int, work: Path, args) -> dict:
    cfg = config(args.batch // ranks, args.iterations, args.device)
    cfg_path = work / f"config{ranks}.yaml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    out = work / f"run{ranks}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(29400 + ranks), "-m", "prunekit", "prune", str(work / "unet.pt"), "-c", str(cfg_path), "-o",
               str(out), "-q"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{ranks} ranks failed:\n{done.stdout}\n{done.stderr}")
    from prunekit.data.trainer import evaluate

    best = prunekit.load_pruned(out)  # after the final fine-tune
    flops = prunekit.count_flops_params(best, torch.rand(1, 1, SIZE, SIZE))["flops"]
    return {"ranks": ranks, "batch_per_rank": args.batch // ranks, "seconds": round(seconds, 2),
            "metric": round(evaluate(best, tiles(n=4, batch=8, seed=3)), 4), "flops": flops}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpus = torch.cuda.device_count()
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, gpus] if gpus > 1 else [1, 2])
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the ranks)")
    parser.add_argument("--iterations", type=int, default=20, help="fine-tuning iterations per step and at the end")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for ranks in args.ranks:
        if args.batch % ranks:
            parser.error(f"--batch {args.batch} does not split over {ranks} ranks.")
    torch.set_num_threads(args.threads)  # the pretraining here too
    env = {**environment(), "gpus": gpus}
    print(environment_line(env) + f", {gpus} GPU(s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pretrained(work / "unet.pt", 60)
        for ranks in args.ranks:
            rows.append(run(ranks, work, args))
            print(f"  {ranks} rank(s): {rows[-1]['seconds']} s, IoU {rows[-1]['metric']}", flush=True)
    base = rows[0]["seconds"]
    print()
    print(table(["ranks", "batch/rank", "wall s", "speed-up", "val IoU", "FLOPs"],
                [[r["ranks"], r["batch_per_rank"], f"{r['seconds']:.1f}", f"{base / r['seconds']:.2f}x",
                  f"{r['metric']:.4f}", f"{r['flops']:,}"] for r in rows], right={0, 1, 2, 3, 4, 5}))
    save_json(args.json, {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
