"""What an attack step costs, as a ratio against one plain (non-private) forward+backward pass.

    python -m benchmarks.attack_cost            # LeNet-5 at batch 512, ResNet-18 at batch 32
    python -m benchmarks.attack_cost --json

An attack step (``attacks.pgd``) is one forward pass and one backward pass for the input gradient only,
inside ``attacks.isolation.attack_view``: no parameter gradients, no per-sample machinery. So it should
cost at most a plain training forward+backward. The private step of every engine is timed alongside for
scale: a PGD-k robust DP step costs about (k x attack step + DP step).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from benchmarks.timing import median_ms

CONFIGS = [("lenet5", "none", 512), ("lenet5", "bn-public", 512), ("resnet18", "group", 32)]


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    return median_ms(fn, steps=repeats, warmup=warmup, device=torch.device("cpu"))


def measure(model_name: str, norm: str, batch: int, repeats: int, engine: str) -> dict:
    from attacks.adversarial import AdversarialBatches
    from attacks.pgd import AttackSpec
    from benchmarks.setup import bench_training

    cpu = torch.device("cpu")
    plain = bench_training(model_name, norm, batch, "non-private", device=cpu, momentum=0.0).training
    bench = bench_training(model_name, norm, batch, engine, device=cpu, momentum=0.0)
    private, x, y = bench.training, bench.images, bench.labels

    def plain_step():
        plain.optimizer.zero_grad()
        F.cross_entropy(plain.model(x), y).backward()

    def private_step():
        private.optimizer.zero_grad()
        private.criterion(private.model(x), y).backward()
        private.optimizer.step()

    pgd_step = AdversarialBatches(AttackSpec("pgd", "linf", 0.1, 0.01, 1, 1), 1.0, torch.Generator().manual_seed(3))
    row = {"model": model_name, "norm": norm, "batch": batch, "engine": engine,
           "plain_fwd_bwd_ms": _median_ms(plain_step, repeats),
           "attack_step_ms": _median_ms(lambda: pgd_step(private.model, x, y), repeats),
           "private_step_ms": _median_ms(private_step, repeats)}
    row["attack_vs_plain"] = row["attack_step_ms"] / row["plain_fwd_bwd_ms"]
    row["private_vs_plain"] = row["private_step_ms"] / row["plain_fwd_bwd_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attack_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine", default="bk", help="private engine the attack runs inside (default bk)")
    args = parser.parse_args(argv)
    rows = [measure(*config, args.repeats, args.engine) for config in CONFIGS]
    lines = ["| model | norm | batch | plain fwd+bwd (ms) | PGD step (ms) | PGD step / plain | "
             f"{args.engine} DP step (ms) | DP step / plain |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['norm']} | {r['batch']} | {r['plain_fwd_bwd_ms']:.0f} | "
                     f"{r['attack_step_ms']:.0f} | {r['attack_vs_plain']:.2f}x | {r['private_step_ms']:.0f} | "
                     f"{r['private_vs_plain']:.2f}x |")
    print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
