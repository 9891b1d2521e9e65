"""kymatio's scattering on this machine: images per second, forward and forward+backward (the input gradient, as
an attack or on-the-fly training through the scattering needs it), at each thread count, for MNIST's and
CIFAR-10's image sizes. The numbers that decide when a ScatterNet model needs a feature cache (docs/models.md).

    python -m benchmarks.scattering [--threads 1 2] [--batch 256] [--out benchmarks/scattering_cpu.json]

Each thread count runs in a fresh process (torch fixes its thread pool once it has used it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def measure(dataset: str, batch: int, repeats: int) -> dict:
    """Median seconds per batch of the model's scattering (standardize + Scattering2D), forward and with the
    input gradient."""
    import torch

    from src.datasets import get_dataset
    from src.models import build_model
    from src.config import ModelConfig

    spec = get_dataset(dataset)
    scattering = build_model(spec, ModelConfig(model="scatternet-linear", norm="none")).scattering
    images = torch.rand(batch, *SHAPES[dataset])
    rows = {}
    for mode in ("forward", "forward+backward"):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            x = images.clone().requires_grad_(mode != "forward")
            start = time.perf_counter()
            if mode == "forward":
                with torch.no_grad():
                    scattering(x)
            else:
                scattering(x).sum().backward()
            times.append(time.perf_counter() - start)
        median = sorted(times[1:])[len(times[1:]) // 2]
        rows[mode] = round(batch / median, 1)
    return rows


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.worker)
    print(json.dumps({dataset: measure(dataset, args.batch, args.repeats) for dataset in SHAPES}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scattering", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    rows = []
    for threads in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        done = subprocess.run([sys.executable, "-m", "benchmarks.scattering", "--worker", str(threads),
                               "--batch", str(args.batch), "--repeats", str(args.repeats)],
                              env=env, capture_output=True, text=True, check=True)
        for dataset, speeds in json.loads(done.stdout.strip().splitlines()[-1]).items():
            rows.append({"dataset": dataset, "threads": threads, "batch": args.batch, **{
                f"{mode} img/s": speed for mode, speed in speeds.items()}})
    for row in rows:
        print(row)
    if args.out:
        args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
