"""Step time and peak memory of every engine, as ratios against non-private training in the same run.

    python -m benchmarks.engines                 # markdown table (about 40 minutes on a 2-core CPU)
    python -m benchmarks.engines --json          # the same rows as a JSON list
    python -m benchmarks.engines --quick         # one small configuration, to check the harness
    python -m benchmarks.engines --peers         # also fastDP and private_vision, if importable

Each (model, norm, batch, engine) configuration runs in a fresh process, so its memory belongs to that
configuration alone: the working set (peak during the steps minus what was in use before the first one) and
the total peak (RSS on a CPU, under a fixed glibc mmap threshold so that RSS follows live tensors; allocated
memory on a GPU), both from ``benchmarks.timing``. The configurations are run in interleaved rounds (every
engine once, then again), and each row reports the median step time and the largest memory over the rounds.
Time comes from a second process under the default allocator (``run_in_subprocess``). A step is what training
does for one logical batch: the public-statistics refresh for bn-public models, forward, backward, clipping and
noise, optimizer step, all through the same ``src.privacy.attach`` path that ``vision.py`` uses. Non-private
training is the baseline of every ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

from benchmarks.peers import PEERS
from benchmarks.timing import FIXED_MALLOC_ENV
from src.engines import BK_KEEP_POLICIES, ENGINES as ALL_ENGINES, PRIVATE_ENGINES

REPO = Path(__file__).resolve().parents[1]
# The baseline first, then every private engine (src.engines).
ENGINES = ["non-private", *PRIVATE_ENGINES]
ENGINE_LABELS = {name: engine.label for name, engine in ALL_ENGINES.items()}
LABELS = {**ENGINE_LABELS, **PEERS}  # with --peers: other implementations (benchmarks.peers)
FULL = [("lenet5", "none", 256), ("lenet5", "bn-public", 256), ("resnet18", "group", 32),
        ("resnet18", "bn-public", 32), ("resnet18", "group", 64), ("resnet18", "bn-public", 64)]
QUICK = [("lenet5", "group", 64)]


def measure(model_name: str, norm: str, batch: int, engine: str, steps: int, warmup: int,
            image_size: int = 0, recipe: Optional[dict] = None) -> dict:
    """One configuration, in this process: median step time (ms), working set and peak memory (MB). The step
    is the training loop's own (``src.loop._physical_step``: augmentation views, forward, backward, clipping,
    noise); ``recipe`` holds more settings of the run (``ws``, ``augmult``, ``bk_keep``, ``bk_layer_budget``). A
    peer engine (``benchmarks.peers``) wraps the same model, weights and batch instead."""
    from benchmarks.setup import bench_training
    from benchmarks.timing import measure_step
    from src.loop import _physical_step

    if engine in PEERS:
        from benchmarks.peers import peer_step

        bench = bench_training(model_name, norm, batch, "non-private", image_size=image_size, recipe=recipe)
        step = peer_step(engine, bench.training.base_model, bench.images, bench.labels, sample_size=4 * batch)
        return measure_step(step, steps=steps, warmup=warmup, device=bench.device).as_dict()
    bench = bench_training(model_name, norm, batch, engine, image_size=image_size, recipe=recipe)
    training, x, y, refresh = bench.training, bench.images, bench.labels, bench.refresh_public

    def step():
        if refresh is not None:
            refresh()
        _physical_step(training, x, y, views=bench.views)

    return measure_step(step, steps=steps, warmup=warmup, device=bench.device).as_dict()


def run_in_subprocess(config: tuple, engine: str, steps: int, warmup: int, image_size: int,
                      recipe_flags: tuple = ()) -> dict:
    """One configuration measured by two fresh processes: time under the default allocator (what training
    runs with), memory under the fixed mmap threshold (``benchmarks.timing``), which makes RSS follow live
    tensors but also makes every freed block fault its pages in again when reused: on this CPU it doubled
    the non-private ResNet-18 step (338 -> 654 ms at batch 32), so it must not time anything."""
    timed = _worker(config, engine, steps, warmup, image_size, recipe_flags, env=dict(os.environ))
    if "error" in timed:
        return timed
    memory = _worker(config, engine, 1, 1, image_size, recipe_flags, env={**os.environ, **FIXED_MALLOC_ENV})
    if "error" in memory:
        return memory
    return {**timed, "peak_mb": memory["peak_mb"], "working_set_mb": memory["working_set_mb"]}


def _worker(config: tuple, engine: str, steps: int, warmup: int, image_size: int, recipe_flags: tuple,
            env: dict) -> dict:
    model_name, norm, batch = config
    command = [sys.executable, "-m", "benchmarks.engines", "--worker", model_name, norm, str(batch), engine,
               "--steps", str(steps), "--warmup", str(warmup), "--image-size", str(image_size), *recipe_flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": reason}
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(configs: list, engines: list, samples: dict) -> list:
    """Rows with medians over rounds and ratios against non-private in the same run."""
    rows = []
    for config in configs:
        model_name, norm, batch = config
        cells = {}
        for engine in engines:
            runs = [s for s in samples[(config, engine)] if "error" not in s]
            if runs:
                cells[engine] = {"step_ms": statistics.median(r["step_ms"] for r in runs),
                                 "peak_mb": max(r["peak_mb"] for r in runs),
                                 "working_set_mb": max(r["working_set_mb"] for r in runs)}
            else:
                cells[engine] = {"error": samples[(config, engine)][-1]["error"]}
        base = cells.get("non-private", {})
        for engine in engines:
            cell = cells[engine]
            row = {"model": model_name, "norm": norm, "batch": batch, "engine": engine,
                   "step_ms": cell.get("step_ms"), "working_set_mb": cell.get("working_set_mb"),
                   "peak_mb": cell.get("peak_mb"), "time_ratio": None, "working_set_ratio": None, "mem_ratio": None}
            if "step_ms" in cell and "step_ms" in base:
                row["time_ratio"] = cell["step_ms"] / base["step_ms"]
                row["working_set_ratio"] = cell["working_set_mb"] / base["working_set_mb"]
                row["mem_ratio"] = cell["peak_mb"] / base["peak_mb"]
            if "error" in cell:
                row["error"] = cell["error"]
            rows.append(row)
    return rows


def markdown(rows: list) -> str:
    lines = ["| model | norm | batch | engine | step (ms) | working set (MB) | peak (MB) | time vs non-private | "
             "working set vs non-private | peak vs non-private |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['norm']} | {r['batch']} | {LABELS[r['engine']]} | "
                         f"failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['norm']} | {r['batch']} | {LABELS[r['engine']]} | "
                     f"{r['step_ms']:.0f} | {r['working_set_mb']:.0f} | {r['peak_mb']:.0f} | {r['time_ratio']:.2f}x | "
                     f"{r['working_set_ratio']:.2f}x | {r['mem_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list (table to stderr)")
    parser.add_argument("--quick", action="store_true", help="one small configuration, one round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of engines")
    parser.add_argument("--configs", default=None,
                        help="model:norm:batch,... (default: LeNet-5 at 256, ResNet-18 at 32 and 64, GroupNorm "
                             "and bn-public)")
    parser.add_argument("--image-size", type=int, default=0, help="square inputs of this size (default: native)")
    parser.add_argument("--save", type=Path, help="also write the JSON rows to this file (atomically)")
    parser.add_argument("--ws", action="store_true", help="weight-standardized convolutions (the recipe's)")
    parser.add_argument("--augmult", type=int, default=0, metavar="K",
                        help="augment each example into K views (the recipe's step; default: no augmentation)")
    parser.add_argument("--bk-keep", choices=BK_KEEP_POLICIES, default=None,
                        help="what bk layers keep until their clipped sums (vision.py --bk-keep)")
    parser.add_argument("--bk-layer-budget", type=float, default=None, metavar="MB",
                        help="bk: recompute the clipped sums of layers whose kept state exceeds MB")
    parser.add_argument("--peers", action="store_true",
                        help="also fastDP and private_vision (benchmarks.peers), where importable")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "NORM", "BATCH", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        model_name, norm, batch, engine = args.worker
        recipe = {"ws": args.ws, **({"augment": True, "augmult": args.augmult} if args.augmult else {})}
        if engine == "bk":
            recipe.update({name: value for name, value in (("bk_keep", args.bk_keep),
                                                           ("bk_layer_budget", args.bk_layer_budget))
                           if value is not None})
        print(json.dumps(measure(model_name, norm, int(batch), engine, args.steps, args.warmup, args.image_size,
                                 recipe)))
        return 0

    from tqdm import tqdm

    engines = [e.strip() for e in args.engines.split(",")]
    if "non-private" not in engines:
        engines.insert(0, "non-private")
    if args.peers:
        engines += [peer for peer in PEERS if peer not in engines]
    unknown = [e for e in engines if e not in ENGINES and e not in PEERS]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if args.configs:
        configs = [(m, n, int(b)) for m, n, b in (c.split(":") for c in args.configs.split(","))]
    else:
        configs = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    samples = {(c, e): [] for c in configs for e in engines}
    jobs = [(c, e) for _ in range(rounds) for c in configs for e in engines]
    for config, engine in tqdm(jobs, desc="benchmark", unit="run", file=sys.stderr, disable=None):
        recipe_flags = ((["--ws"] if args.ws else []) + (["--augmult", str(args.augmult)] if args.augmult else [])
                        + (["--bk-keep", args.bk_keep] if args.bk_keep else [])
                        + (["--bk-layer-budget", str(args.bk_layer_budget)] if args.bk_layer_budget is not None
                           else []))
        samples[(config, engine)].append(run_in_subprocess(config, engine, args.steps, args.warmup,
                                                           args.image_size, tuple(recipe_flags)))
    rows = summarise(configs, engines, samples)
    if args.save:
        from src.atomic_files import atomic_write_json

        atomic_write_json(args.save, rows)
    if args.json:
        print(markdown(rows), file=sys.stderr)
        print(json.dumps(rows, indent=1))
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    sys.exit(main())
