#!/usr/bin/env python3
"""Train a differentially private image classifier: flags -> validated config -> dataset module -> training.

    python vision.py --dataset mnist                       # LeNet-5, DP-SGD at the MNIST defaults
    python vision.py --dataset cifar10 --noise 1.0         # ResNet-18
    python vision.py --dataset mnist --dry-run             # the privacy plan as JSON, no data loaded
    python vision.py --dataset cifar10 --explain-engine    # per-layer per-sample gradient norm methods
    python vision.py --dataset mnist --robust              # PGD adversarial training under DP
    python vision.py --dataset mnist --eval-only RUN_DIR   # clean and robust accuracy of a saved model
    python vision.py --resume RUN_DIR                      # continue a killed run from its last checkpoint
    torchrun --nproc_per_node 2 vision.py --dataset mnist  # data-parallel DP training (src.distributed)
"""
import contextlib
import json
import logging
import os
import sys

# PyTorch's CPU allocator asks for transparent huge pages (madvise) on allocations of 2 MB and more when this is set;
# read once, at its first allocation, so before torch is imported. Without it every large tensor a step allocates
# (a ScatterNet's 8192-example batch of cached features is 510 MB) is faulted in 4 KB pages: on the 2-core CPU a
# CIFAR-10 scatternet-linear epoch took 7.4 s, with it 4.3 s (20 times fewer page faults). A user's own value wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv=None) -> int:
    from src.cli import parse_flags, report_error
    from src.errors import UserError

    flags, actions = parse_flags(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
    try:
        with _process_group(flags):
            return _dispatch(flags, actions)
    except UserError as error:
        return report_error(str(error))


@contextlib.contextmanager
def _process_group(flags: dict):
    """Under torchrun (WORLD_SIZE > 1): join the process group for the command, and leave it after. Rank 0
    prints and logs for the run; the other ranks report only errors. One process: nothing (and no torch
    import, so that a bad flag is answered at once)."""
    if int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
        yield
        return
    from src import distributed

    ranks = distributed.ranks_from_environment()
    distributed.start(ranks, flags.get("device") or "auto")
    if not ranks.is_main:
        sys.stdout = open(os.devnull, "w")
        logging.getLogger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        distributed.stop()


def _dispatch(flags: dict, actions: dict) -> int:
    """The mode the flags ask for: resume, evaluate a saved model, print the plan or the engine, or train."""
    from src.config import build_config
    from src.datasets import get_dataset, validate_for_dataset

    if actions["resume"]:  # the modes are exclusive in the parser (src.cli)
        from src.resume import resume_config
        from src.train import exit_code_for, run

        config, spec = resume_config(actions["resume"], flags)
        return exit_code_for(run(config, spec, resume=True))
    spec = get_dataset(flags["dataset"])
    config = build_config(flags, spec.defaults)
    validate_for_dataset(config, spec)
    if actions["eval_only"]:
        from src.eval_only import run_eval_only

        return 0 if run_eval_only(config, spec, actions["eval_only"]).status == "finished" else 1
    if actions["dry_run"]:
        from src.plan import dry_run_report

        print(json.dumps(dry_run_report(config, spec), allow_nan=False))
        return 0
    if actions["explain_engine"]:
        from src.plan import engine_table

        print(engine_table(config, spec))
        return 0
    from src.train import exit_code_for, run

    return exit_code_for(run(config, spec))


if __name__ == "__main__":
    sys.exit(main())
