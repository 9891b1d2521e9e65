"""Run a sweep on this machine: every grid point is an ordinary ``vision.py`` run.

    python -m experiments.run experiments/sweeps/mnist_study.yaml --jobs 2 [--out runs] [-- EXTRA VISION FLAGS]

Runs go to ``<out>/<sweep name>/<run id>/`` (the usual run-directory format), their console output to
``<out>/<sweep name>/_logs/<run id>.log``. Rerunning is resumable: a run whose ``summary.json`` says
``finished``, ``diverged`` or ``budget-exhausted`` (a real outcome) is skipped; one that failed, was
interrupted or was killed mid-run continues from its last checkpoint (``vision.py --resume``), and one
without a checkpoint is moved aside to ``<run id>.attempt-N`` and run again. ``--wandb-spec`` prints the same grid as a
wandb sweep instead, for ``wandb sweep`` + ``wandb agent`` on many machines. ``--evaluate ATTACK`` then
re-evaluates every finished run under another attack (``vision.py --eval-only``) into ``<out>/<sweep>-<attack>/``.

SIGTERM or SIGINT to the runner is forwarded to its running points (each checkpoints and stops as
``interrupted``, ``src.preemption``); no new point starts, and the runner exits with code 130 once they have
stopped. The next call resumes them.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml
from tqdm import tqdm

from attacks.defaults import EVAL_ATTACKS
from experiments.sweep import GridPoint, Stage, Sweep, load_sweep, wandb_sweep_spec
from src.config import WANDB_MODES
from src.errors import UserError
from src.run_directory import RunDirectory

REPO = Path(__file__).resolve().parents[1]
DONE_STATES = ("finished", "diverged", "budget-exhausted")
RESUMABLE_STATES = ("running", "failed", "interrupted")  # "running" on disk: the process was killed


def run_state(run_dir: Path) -> str:
    """'missing', or the status in summary.json ('unreadable' if it cannot be read)."""
    return RunDirectory(run_dir).status()


def set_aside(run_dir: Path) -> Path:
    """Keep a failed attempt for inspection, out of the way of the retry (and of result collection)."""
    attempt = 1
    while run_dir.with_name(f"{run_dir.name}.attempt-{attempt}").exists():
        attempt += 1
    target = run_dir.with_name(f"{run_dir.name}.attempt-{attempt}")
    run_dir.rename(target)
    return target


# a trained run's flags that an evaluation of it keeps: the same test images, threat model and seed
EVALUATION_FLAGS = ("data-root", "pgd-norm", "pgd-eps", "eval-robust-size", "seed")


def evaluation_stage(trained: Sweep, out: Path, attack: str, name: str = "") -> Stage:
    """``vision.py --eval-only`` of every finished run of ``trained`` under ``attack``, into
    ``<out>/<name or trained's name-attack>/`` under the trained runs' ids, so that ``experiments.collect
    --evaluations`` puts each accuracy beside the run it measured. Runs not yet finished are left out; the
    next call picks them up."""
    points = []
    for point in trained.points():
        run_path = out / trained.name / point.run_id
        if run_state(run_path) != "finished":
            continue
        flags = {k: v for k, v in point.flags.items() if k in EVALUATION_FLAGS}
        points.append(GridPoint(run_id=point.run_id, values=point.values,
                                flags={**flags, "eval-only": str(run_path.resolve()), "eval-attack": attack}))
    return Stage(name or f"{trained.name}-{attack}", trained.dataset, points)


def evaluation_extra(extra: list) -> list:
    """The runner's extra ``vision.py`` flags that an evaluation takes too (``--data-root``, ...); training
    flags are left out, since ``--eval-only`` refuses them."""
    kept, index = [], 0
    while index < len(extra):
        name = extra[index].lstrip("-").split("=")[0]
        takes_value = "=" not in extra[index] and index + 1 < len(extra) and not extra[index + 1].startswith("--")
        item = extra[index:index + 2] if takes_value else extra[index:index + 1]
        if name in EVALUATION_FLAGS:
            kept += item
        index += len(item)
    return kept


def command_for(sweep: Sweep, point: GridPoint, sweep_dir: Path, extra: list, wandb_mode: str) -> list:
    return [sys.executable, str(REPO / "vision.py"), "--dataset", sweep.dataset, *point.argv(), *extra,
            "--out", str(sweep_dir), "--run-id", point.run_id, "--wandb-group", sweep.name, "--wandb", wandb_mode]


def resume_command(run_dir: Path, wandb_mode: str) -> list:
    """Continue a run with its own config.json (extra flags would change the experiment)."""
    return [sys.executable, str(REPO / "vision.py"), "--resume", str(run_dir), "--wandb", wandb_mode]


class RunningPoints:
    """The points' processes, so that a signal to the runner reaches them (a scheduler's SIGTERM goes to the
    runner alone; Ctrl-C reaches the whole process group anyway, and a second one is forwarded too)."""

    def __init__(self):
        self._processes: set = set()
        self._lock = threading.Lock()
        self.stopping: str = ""
        self._previous: dict = {}

    def __enter__(self) -> "RunningPoints":
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _forward(self, number: int, frame) -> None:
        self.stopping = signal.Signals(number).name
        with self._lock:
            for process in self._processes:
                if process.poll() is None:
                    process.send_signal(number)

    def run(self, command: list, log_path: Path, threads: int) -> int:
        """Run one point (its output to ``log_path``) unless the runner is stopping; its exit code."""
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("WANDB_SILENT", "true")
        with open(log_path, "a") as log:
            with self._lock:
                if self.stopping:
                    return 130
                process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # signals reach it through the runner only
                self._processes.add(process)
            try:
                return process.wait()
            finally:
                with self._lock:
                    self._processes.discard(process)


def run_sweep(sweep: Sweep, *, out: Path, jobs: int, extra: list, wandb_mode: str = "offline") -> dict:
    sweep_dir = out / sweep.name
    (sweep_dir / "_logs").mkdir(parents=True, exist_ok=True)
    points = sweep.points()
    todo, counts = [], {"skipped": 0, "finished": 0, "failed": 0, "retried": 0, "resumed": 0, "stopped": 0}
    for point in points:
        run_dir = sweep_dir / point.run_id
        state = run_state(run_dir)
        if state in DONE_STATES:
            counts["skipped"] += 1
            continue
        if state in RESUMABLE_STATES and RunDirectory(run_dir).has_checkpoint():
            counts["resumed"] += 1
            todo.append((point, resume_command(run_dir, wandb_mode)))
            continue
        if state != "missing":
            set_aside(run_dir)
            counts["retried"] += 1
        todo.append((point, command_for(sweep, point, sweep_dir, extra, wandb_mode)))
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    failures = []
    bar = tqdm(total=len(points), initial=counts["skipped"], desc=f"sweep {sweep.name}", unit="run",
               file=sys.stderr, dynamic_ncols=True)
    with bar, RunningPoints() as running, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(running.run, command, sweep_dir / "_logs" / f"{p.run_id}.log", threads): p
                   for p, command in todo}
        for future in as_completed(futures):
            point = futures[future]
            code = future.result()
            state = run_state(sweep_dir / point.run_id)
            if code == 0 or state in DONE_STATES:
                counts["finished"] += 1
            elif running.stopping and state in ("missing", "interrupted"):  # stopped or never started: resumable
                counts["stopped"] += 1
            else:
                counts["failed"] += 1
                failures.append(f"{point.run_id} (exit {code}, {state}; see _logs/{point.run_id}.log)")
            bar.update(1)
    summary = {"sweep": sweep.name, "runs": len(points), **counts, "failures": failures,
               "directory": str(sweep_dir), "stopped_by": running.stopping}
    return summary


def _jobs(text: str) -> int:
    jobs = int(text)
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {jobs}")
    return jobs


def add_runner_arguments(parser: argparse.ArgumentParser, out_help: str, list_help: str) -> None:
    """The flags the sweep runner and the study runner share, declared once for both."""
    parser.add_argument("--jobs", type=_jobs, default=1, help="runs at once (each gets cores/jobs threads)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help=f"{out_help} (default runs)")
    parser.add_argument("--wandb", choices=WANDB_MODES, default="offline")
    parser.add_argument("--list", action="store_true", help=list_help)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file")
    add_runner_arguments(parser, out_help="folder for the sweep's folder", list_help="list the grid points and their "
                         "state, run nothing")
    parser.add_argument("--wandb-spec", action="store_true", help="print the wandb sweep spec (YAML) and exit")
    parser.add_argument("--evaluate", choices=EVAL_ATTACKS, help="then re-evaluate every finished run with "
                        "vision.py --eval-only under this attack (same radius, images and seed), into "
                        "<out>/<sweep name>-<attack>/ (resumable like the sweep)")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep_file)
        if args.wandb_spec:
            print(yaml.safe_dump(wandb_sweep_spec(sweep), sort_keys=False))
            return 0
        if args.list:
            for point in sweep.points():
                print(f"{run_state(args.out / sweep.name / point.run_id):10s} {point.run_id}")
            return 0
        summaries = [run_sweep(sweep, out=args.out, jobs=args.jobs, extra=extra, wandb_mode=args.wandb)]
        if args.evaluate and not summaries[0]["stopped_by"]:
            summaries.append(run_sweep(evaluation_stage(sweep, args.out, args.evaluate), out=args.out,
                                       jobs=args.jobs, extra=evaluation_extra(extra), wandb_mode=args.wandb))
    except UserError as error:
        print(f"experiments.run: error: {error}", file=sys.stderr)
        return 2
    codes = [report(summary) for summary in summaries]
    return 130 if 130 in codes else max(codes)


def report(summary: dict) -> int:
    """Print a sweep's outcome; its exit code (130 when stopped by a signal, 1 when a run failed)."""
    stopped = f", {summary['stopped']} stopped or not started" if summary["stopped"] else ""
    print(f"sweep {summary['sweep']}: {summary['runs']} runs, {summary['skipped']} already done, "
          f"{summary['finished']} finished now, {summary['failed']} failed ({summary['retried']} restarted, "
          f"{summary['resumed']} resumed from a checkpoint)"
          f"{stopped}; {summary['directory']}")
    for failure in summary["failures"]:
        print(f"  failed: {failure}")
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']}: the interrupted points resume on the next call")
        return 130
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
