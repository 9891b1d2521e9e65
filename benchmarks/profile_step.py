"""Where one training step spends its time: the torch profiler over the training loop's own step.

    python -m benchmarks.profile_step --model resnet18 --norm group --batch 16 --engine bk --ws --augmult 4
    python -m benchmarks.profile_step ... --channels-last     # the same step in channels-last memory format

Prints the operators with the most self time, then where the copies (``aten::copy_``) come from: the chain
of operators that called each (this torch records no Python stacks for CPU operators), e.g. the reshape of
an einsum, so that a redundant copy can be traced to the code that makes it. The step is ``src.loop._physical_step``
(augmentation views, forward, backward, clipping, noise) on the setup of ``benchmarks.engines``; this is
for finding waste, not for ratios (use ``benchmarks.engines`` for those).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict


def _site(event, depth: int) -> str:
    """The operators that called this one, innermost first (``depth`` of them): e.g. ``aten::clone <-
    aten::contiguous <- aten::reshape <- aten::einsum`` names the reshape of an einsum as a copy's source."""
    names, parent = [], event.cpu_parent
    while parent is not None and len(names) < depth:
        names.append(parent.name)
        parent = parent.cpu_parent
    return " <- ".join(names) or "(top level)"


def copy_sites(events, depth: int) -> list:
    """(self CPU ms, calls, call site) of every aten::copy_ call site, most expensive first."""
    sites = defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.name == "aten::copy_":
            cell = sites[_site(event, depth)]
            cell[0] += event.self_cpu_time_total / 1000
            cell[1] += 1
    return sorted(((ms, calls, site) for site, (ms, calls) in sites.items()), reverse=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=["lenet5", "resnet18"])
    parser.add_argument("--norm", default="group")
    parser.add_argument("--batch", type=int, default=16, help="examples per step (default 16)")
    parser.add_argument("--engine", default="bk")
    parser.add_argument("--ws", action="store_true", help="weight-standardized convolutions")
    parser.add_argument("--augmult", type=int, default=0, metavar="K", help="augment into K views (default: off)")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last format")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps, after one warm-up step (default 2)")
    parser.add_argument("--top", type=int, default=15, help="operators and copy sites listed (default 15)")
    parser.add_argument("--depth", type=int, default=4, help="calling operators that name a copy's source (default 4)")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.setup import bench_training
    from src.loop import _physical_step

    recipe = {"ws": args.ws, **({"augment": True, "augmult": args.augmult} if args.augmult else {})}
    bench = bench_training(args.model, args.norm, args.batch, args.engine, recipe=recipe)
    images = bench.images
    if args.channels_last:
        bench.training.model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step():
        if bench.refresh_public is not None:
            bench.refresh_public()
        _physical_step(bench.training, images, bench.labels, views=bench.views)

    step()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - started) / args.steps
    print(f"{args.model} {args.norm} batch {args.batch} engine {args.engine} ws={args.ws} augmult={args.augmult} "
          f"channels_last={args.channels_last}: {1000 * seconds:.0f} ms per step under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    sites = copy_sites(prof.events(), args.depth)
    total = sum(ms for ms, _, _ in sites)
    print(f"aten::copy_ by calling operators ({total / args.steps:.0f} ms per step in all):")
    for ms, calls, site in sites[:args.top]:
        print(f"  {ms / args.steps:8.1f} ms {calls // args.steps:5d} calls  {site}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    sys.exit(main())
