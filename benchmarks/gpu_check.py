"""Everything worth measuring on the first machine with a GPU, in one unattended run within a time budget.

    python -m benchmarks.gpu_check                                   # every part, 480 s, benchmarks/results_gpu.json
    python -m benchmarks.gpu_check --parts headline --out /tmp/h.json   # re-run one part

The parts, always in this order (each gets its share of the budget that is left, so the time one part does not
use passes to the next; what a part leaves out for time it records under ``skipped_for_time``):

- ``tests``: ``tests/test_gpu.py`` under pytest in a subprocess: counts and duration;
- ``headline``: a slice of ``vision.py --dataset cifar10 --robust --noise 1.0`` built by the run's own
  ``src.train._prepare`` and stepped by ``src.loop._physical_step`` through Opacus's Poisson sampler and
  BatchMemoryManager: warm-up physical batches, then timed ones, extrapolated to an epoch and to the run from
  its privacy plan (on real CIFAR-10 when ``--data-root`` holds it, else synthetic images of the same shape);
- ``engines``: images per second of every engine (``src.engines``), ResNet-18 at batch 256 on 32x32 input, in
  fp32 and bf16 (engines that refuse bf16 are recorded with the reason the config gives);
- ``max-batch``: the largest batch per engine (fp32, 32x32): doubling until CUDA runs out of memory, then
  bisection.

The JSON report is rewritten atomically after every part, so a machine taken away mid-run still leaves what was
measured (``complete`` is false until the end). Without a CUDA device it measures nothing, writes nothing and
exits 2.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results_gpu.json"
HEADLINE_ARGV = ("--dataset", "cifar10", "--robust", "--noise", "1.0")
NO_CUDA = "gpu_check: no CUDA device here; nothing measured"
PROG = "python -m benchmarks.gpu_check"


def say(message: str) -> None:
    """Progress for an unattended run with a hard time limit: one flushed line per event."""
    print(f"gpu_check: {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """The wall-clock budget of the whole check (``time.monotonic`` seconds). ``reserve_s`` is kept back for the
    overrun of a last measurement, the report and the summary."""

    total_s: float
    started: float
    reserve_s: float = 15.0

    def remaining(self, now: float) -> float:
        return max(0.0, self.started + self.total_s - self.reserve_s - now)

    def allot(self, share: float, later_shares: float, now: float) -> float:
        """A part's seconds: its share of what is left, against the shares of the parts still to come (so time an
        earlier part did not use rolls over to the later ones)."""
        return self.remaining(now) * share / (share + later_shares)


# ---------------------------------------------------------------------------------------------------- tests

SUMMARY_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
SUMMARY_TIME = re.compile(r"\bin ([\d.]+)s\b")


def pytest_counts(output: str) -> dict:
    """Counts from pytest's last summary line (``1 failed, 7 passed, 1 skipped in 80.12s (0:01:20)``); zeros for
    outcomes it does not name, and ``summary_found`` false when there is no such line (killed, crashed)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "xpassed": 0,
              "pytest_seconds": None, "summary_found": False}
    lines = [line for line in output.splitlines() if SUMMARY_TIME.search(line) and
             (SUMMARY_COUNT.search(line) or "no tests ran" in line)]
    if not lines:
        return counts
    last = lines[-1]
    for number, outcome in SUMMARY_COUNT.findall(last):
        counts["errors" if outcome.startswith("error") else outcome] = int(number)
    counts.update(pytest_seconds=float(SUMMARY_TIME.search(last).group(1)), summary_found=True)
    return counts


def run_gpu_tests(limit_s: float, *, test_path: str = "tests/test_gpu.py") -> dict:
    """pytest on ``test_path`` in its own process group, killed with everything it started (the tests run
    ``vision.py`` in subprocesses) when ``limit_s`` runs out; the output's tail is kept when anything failed."""
    command = [sys.executable, "-m", "pytest", test_path, "-q", "-rfEs", "-p", "no:cacheprovider"]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timed_out = False
    try:
        output, _ = process.communicate(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    result = {"command": " ".join(["python", *command[1:]]), "returncode": process.returncode,
              "timed_out": timed_out, "seconds": round(time.monotonic() - started, 2), **pytest_counts(output)}
    if timed_out or process.returncode != 0:
        result["output_tail"] = output.splitlines()[-40:]
    return result


# ---------------------------------------------------------------------------------------------------- device


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device) -> None:
    """Drop what the last measurement left (Python cycles, then the allocator's cached blocks), so the next one
    starts from an empty device."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


OUT_OF_MEMORY_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                         "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or the RuntimeErrors that cuBLAS/cuDNN (and the CPU allocator) raise instead."""
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in OUT_OF_MEMORY_MARKERS))


def one_line(error: BaseException) -> str:
    """An error as the report keeps it: its type and first line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def environment(device) -> dict:
    """What produced the numbers (cifar10-airbench habit): device, library versions, git commit."""
    import opacus
    import torch

    from src.tracking import git_commit

    found = {"device": platform.processor() or platform.machine(), "device_memory_gb": None,
             "compute_capability": None}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        found = {"device": torch.cuda.get_device_name(device),
                 "device_memory_gb": round(properties.total_memory / 2 ** 30, 1),
                 "compute_capability": f"{properties.major}.{properties.minor}"}
    return {**found, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "opacus": opacus.__version__, "python": platform.python_version(), "git_commit": git_commit(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------------------------------- headline


def extrapolate(seconds_per_batch: float, *, physical_batch_size: int, expected_batch_size: int,
                steps_per_epoch: int, steps: int) -> dict:
    """One epoch is ``steps_per_epoch`` logical batches of ``expected_batch_size`` examples (Opacus's Poisson
    schedule, ``src.accounting.poisson_schedule``), put through the model ``physical_batch_size`` examples at a
    time; time is taken to scale with examples (the sampled batch sizes vary around their expectation and the
    last physical batch of each logical batch is smaller)."""
    per_step = expected_batch_size / physical_batch_size
    per_epoch = per_step * steps_per_epoch
    run_s = per_step * steps * seconds_per_batch
    return {"seconds_per_physical_batch": seconds_per_batch, "physical_batches_per_step": per_step,
            "physical_batches_per_epoch": per_epoch, "epoch_s": per_epoch * seconds_per_batch, "run_s": run_s,
            "run_h": run_s / 3600}


def headline_config(data_root: str, device, extra_argv: tuple = ()) -> tuple:
    """(config, dataset spec) of the headline command, parsed by ``vision.py``'s own parser and defaults: the data
    root given, no download attempt (a GPU box may have no network), no wandb, and ``extra_argv`` (tests shrink
    the step with it)."""
    from src.cli import parse_flags
    from src.config import build_config
    from src.datasets import get_dataset

    flags, _ = parse_flags([*HEADLINE_ARGV, "--data-root", str(data_root), "--no-download", "--device",
                            device.type, "--wandb", "disabled", *map(str, extra_argv)])
    spec = get_dataset(flags["dataset"])
    return build_config(flags, spec.defaults), spec


def synthetic_data(spec, data_config, with_public: bool):
    """Random uint8 images of the dataset's shape, as many as the run plans with (``planned_train_size``): a
    step's time depends on shapes, not on pixels."""
    import torch

    from src.data import ImageTensorDataset, LoadedData, PublicData

    generator = torch.Generator().manual_seed(0)

    def images(n):
        return torch.randint(0, 256, (n, *spec.image_shape), dtype=torch.uint8, generator=generator)

    def labels(n):
        return torch.randint(0, spec.num_classes, (n,), generator=generator)

    n = spec.planned_train_size(data_config)
    public = PublicData(images=images(data_config.public_size), source="synthetic") if with_public else None
    return LoadedData(train=ImageTensorDataset(images(n), labels(n)), test=ImageTensorDataset(images(64), labels(64)),
                      public=public, notes=[f"synthetic {spec.name}-shaped images ({n})"])


def real_or_synthetic(spec) -> tuple:
    """(a spec whose loader reads the real data set, or falls back to ``synthetic_data`` when it is not on disk;
    a dict that says which it used and why)."""
    from src.errors import DataUnavailable

    source = {"data": None}

    def load(data_config, with_public):
        try:
            data = spec.load(data_config, with_public)
            source.update(data="real", notes=list(data.notes))
        except DataUnavailable as missing:
            source.update(data="synthetic", reason=str(missing))
            data = synthetic_data(spec, data_config, with_public)
        return data

    return dataclasses.replace(spec, load=load), source


def physical_batches(training, physical_batch_size: int):
    """Physical batches as training draws them (Opacus's Poisson sampler split by BatchMemoryManager, which also
    tells the optimizer which steps to skip), epoch after epoch."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    while True:
        with BatchMemoryManager(data_loader=training.train_loader, max_physical_batch_size=physical_batch_size,
                                optimizer=training.optimizer) as batches:
            yield from batches


def headline_slice(device, *, data_root: str, warmup: int, batches: int, deadline: float,
                   extra_argv: tuple = ()) -> dict:
    """Time the physical batches of the headline run, as ``src.loop.train_epoch`` steps them (public statistics
    refreshed per logical batch where the model has them, the EMA updated after each optimizer step), and
    extrapolate an epoch and the run from the plan on the complete training set. Left out: evaluation (clean and
    robust, every epoch with --robust), checkpoints and the per-step finite-weights check."""
    import torch

    from benchmarks.timing import measure_step
    from src.accounting import plan_privacy
    from src.loop import _physical_step
    from src.train import _prepare

    config, spec = headline_config(data_root, device, extra_argv)
    loading, source = real_or_synthetic(spec)
    started = time.monotonic()
    prepared = _prepare(config, loading)
    setup_s = time.monotonic() - started
    plan = plan_privacy(config, n_train=spec.planned_train_size(config.data))  # the run on the complete set
    training, physical = prepared.training, config.train.physical_batch_size
    source_batches = physical_batches(training, physical)
    sizes = []
    starts_logical_batch = [True]

    def step():
        images, labels = next(source_batches)
        if prepared.refresh_public is not None and starts_logical_batch[0]:
            prepared.refresh_public()
        _physical_step(training, images.to(device), labels.to(device), prepared.adversarial, views=prepared.views,
                       numerics=prepared.numerics)
        starts_logical_batch[0] = training.took_step()
        if starts_logical_batch[0] and prepared.ema is not None:
            prepared.ema.update_parameters(training.base_model)
        sizes.append(len(labels))

    warmup_s = []
    for _ in range(warmup):
        began = time.perf_counter()
        step()
        synchronize(device)
        warmup_s.append(time.perf_counter() - began)
    estimate = warmup_s[-1] if warmup_s else 0.0
    room = deadline - time.monotonic()
    timed = batches if estimate <= 0 else max(0, min(batches, int(room / estimate)))
    c, t, r = config.train, config.privacy, config.robust
    result = {"command": "python vision.py " + " ".join(HEADLINE_ARGV), "extra_flags": list(map(str, extra_argv)),
              "data_root": str(data_root), **source, "n_loaded": len(prepared.data.train),
              "settings": {"engine": t.engine, "norm": config.model.norm, "ws": config.model.ws,
                           "physical_batch_size": physical, "batch_size": c.batch_size, "augmult": c.augmult,
                           "attack": r.attack, "pgd_steps": r.pgd_steps, "precision": c.precision, "ema": c.ema},
              "plan": {key: getattr(plan, key) for key in ("n_train", "epochs", "steps_per_epoch", "steps",
                                                            "expected_batch_size", "sample_rate",
                                                            "noise_multiplier", "epsilon")},
              "setup_s": setup_s, "warmup_s": warmup_s, "requested_batches": batches, "timed_batches": timed,
              "excluded": "evaluation (clean, and robust every epoch with --robust), checkpoints, the finite-weights "
                          "check after each step"}
    if timed:
        sizes.clear()
        cost = measure_step(step, steps=timed, warmup=0, device=device)
        result.update(batch_s_median=cost.step_ms / 1000, examples_per_timed_batch=sum(sizes) / len(sizes),
                      peak_mb=cost.peak_mb, working_set_mb=cost.working_set_mb,
                      extrapolated=extrapolate(cost.step_ms / 1000, physical_batch_size=physical,
                                               expected_batch_size=plan.expected_batch_size,
                                               steps_per_epoch=plan.steps_per_epoch, steps=plan.steps))
    if device.type == "cuda":
        result["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    del prepared, training, source_batches
    release_memory(device)
    return result


# ---------------------------------------------------------------------------------------------------- engines


def measure_engine(engine: str, precision: str, batch: int, device, *, warmup: int, steps: int) -> dict:
    """One engine's step (a logical batch of ``batch`` in one physical batch: forward, backward, clipping, noise,
    update) on ResNet-18 (GroupNorm) at 32x32, set up by ``benchmarks.setup`` as every benchmark is. Raises the
    config's UserError for a precision the engine refuses."""
    from benchmarks.setup import bench_training
    from benchmarks.timing import measure_step
    from src.loop import Numerics, _physical_step

    bench = bench_training("resnet18", "group", batch, engine, device=device, recipe={"precision": precision})
    numerics = Numerics(precision=precision)

    def step():
        if bench.refresh_public is not None:
            bench.refresh_public()
        _physical_step(bench.training, bench.images, bench.labels, views=bench.views, numerics=numerics)

    cost = measure_step(step, steps=steps, warmup=warmup, device=device)
    return {"step_ms": cost.step_ms, "images_per_s": batch / (cost.step_ms / 1000), "peak_mb": cost.peak_mb,
            "working_set_mb": cost.working_set_mb}


def engine_throughput(device, *, engines: tuple, precisions: tuple, batch: int, warmup: int, steps: int,
                      deadline: float) -> list:
    """Every (precision, engine) measured, refused (bf16 on Opacus's engines: the config's one-line reason), out
    of memory, or skipped because the next measurement (estimated by the last one's wall time) would pass
    ``deadline``. ``vs_non_private``: images per second against non-private at the same precision."""
    from src.engines import ENGINES
    from src.errors import UserError

    rows, last_s = [], 0.0
    for precision in precisions:
        for engine in engines:
            row = {"engine": engine, "label": ENGINES[engine].label, "precision": precision, "batch": batch}
            rows.append(row)
            if time.monotonic() + last_s > deadline:
                row["skipped"] = "time budget"
                continue
            began = time.monotonic()
            try:
                row.update(measure_engine(engine, precision, batch, device, warmup=warmup, steps=steps))
            except UserError as refused:
                row["skipped"] = str(refused)
                continue
            except Exception as error:  # noqa: BLE001 -- recorded; the other engines still run
                row["error"] = "out of memory" if is_out_of_memory(error) else one_line(error)
            finally:
                release_memory(device)
            last_s = time.monotonic() - began
            row["seconds"] = last_s
    for row in rows:
        base = next((r for r in rows if r["engine"] == "non-private" and r["precision"] == row["precision"]
                     and "images_per_s" in r), None)
        if base is not None and "images_per_s" in row:
            row["vs_non_private"] = row["images_per_s"] / base["images_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------------- max batch


@dataclass(frozen=True)
class BatchSearch:
    """The largest batch that fitted and the smallest that did not (None: none fitted, or none failed up to the
    limit), every try in order, and why the search stopped: bisected, limit, time or none-fit."""

    largest: Optional[int]
    smallest_failed: Optional[int]
    tries: tuple
    stopped: str

    def as_dict(self) -> dict:
        return {"largest": self.largest, "smallest_failed": self.smallest_failed,
                "tries": [{"batch": b, "fits": ok} for b, ok in self.tries], "stopped": self.stopped}


def search_largest_batch(fits: Callable[[int], bool], *, start: int, limit: int,
                         out_of_time: Callable[[], bool] = lambda: False) -> BatchSearch:
    """Doubling from ``start`` (halving if even that fails) brackets the largest batch between one that fits and
    one that does not; bisection then narrows the bracket to 1/16 of the batch that fits (the answer is then at
    most ~6% below the true largest, in 4-5 more tries). Memory use is taken to grow with the batch."""
    tries = []

    def attempt(batch: int) -> bool:
        ok = bool(fits(batch))
        tries.append((batch, ok))
        return ok

    low, high, batch = None, None, min(start, limit)
    if out_of_time():
        return BatchSearch(None, None, (), "time")
    if attempt(batch):
        low = batch
        while high is None:
            if low >= limit:
                return BatchSearch(low, None, tuple(tries), "limit")
            if out_of_time():
                return BatchSearch(low, None, tuple(tries), "time")
            batch = min(2 * low, limit)
            if attempt(batch):
                low = batch
            else:
                high = batch
    else:
        high = batch
        while low is None:
            if high == 1:
                return BatchSearch(None, 1, tuple(tries), "none-fit")
            if out_of_time():
                return BatchSearch(None, high, tuple(tries), "time")
            batch = high // 2
            if attempt(batch):
                low = batch
            else:
                high = batch
    while high - low > max(1, low // 16):
        if out_of_time():
            return BatchSearch(low, high, tuple(tries), "time")
        middle = (low + high) // 2
        if attempt(middle):
            low = middle
        else:
            high = middle
    return BatchSearch(low, high, tuple(tries), "bisected")


class FitsOnDevice:
    """``fits(batch)``: whether ``steps`` training steps of ``engine`` (ResNet-18, GroupNorm, 32x32, fp32) at that
    batch run on ``device``: the first step allocates the gradients and the optimizer's state, the second runs with
    them. Running out of memory means no; so does any other error (a kernel's size limit, say), which is kept in
    ``errors`` for the report, since the search should still find the largest batch that works. Memory is released
    after every try."""

    def __init__(self, engine: str, device, *, steps: int = 2):
        self.engine, self.device, self.steps = engine, device, steps
        self.errors = []  # [{"batch": B, "error": one line}] for failures other than running out of memory

    def __call__(self, batch: int) -> bool:
        from benchmarks.setup import bench_training
        from src.loop import _physical_step

        fitted, bench = False, None
        try:
            bench = bench_training("resnet18", "group", batch, self.engine, device=self.device)
            for _ in range(self.steps):
                _physical_step(bench.training, bench.images, bench.labels, views=bench.views)
            synchronize(self.device)
            fitted = True
        except Exception as error:  # noqa: BLE001 -- every failure is a "no"; the unexpected ones are kept
            if not is_out_of_memory(error):
                self.errors.append({"batch": batch, "error": one_line(error)})
        finally:
            bench = None
        release_memory(self.device)
        return fitted


def largest_batches(device, *, engines: tuple, start: int, limit: int, deadline: float) -> list:
    """``search_largest_batch`` for every engine; each gets an equal share of the time left before ``deadline``
    (what one leaves passes to the next). Failures other than running out of memory are listed under ``errors``."""
    from src.engines import ENGINES

    rows = []
    for index, engine in enumerate(engines):
        now = time.monotonic()
        row = {"engine": engine, "label": ENGINES[engine].label, "precision": "fp32"}
        rows.append(row)
        if now >= deadline:
            row["skipped"] = "time budget"
            continue
        engine_deadline = now + (deadline - now) / (len(engines) - index)
        say(f"  max-batch {engine}: up to {engine_deadline - now:.0f} s")
        fits = FitsOnDevice(engine, device)
        row.update(search_largest_batch(fits, start=start, limit=limit,
                                        out_of_time=lambda: time.monotonic() > engine_deadline).as_dict())
        if fits.errors:
            row["errors"] = fits.errors
        row["seconds"] = time.monotonic() - now
    return rows


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class GpuCheckReport:
    """The one JSON file the check writes, after every part (atomically: ``src.atomic_files``), read back through
    ``load``."""

    environment: dict
    budget_s: float
    parts_requested: list
    arguments: dict = field(default_factory=dict)  # the flags it ran with
    parts: dict = field(default_factory=dict)
    skipped_for_time: list = field(default_factory=list)
    complete: bool = False
    wall_s: Optional[float] = None
    tool: str = "benchmarks.gpu_check"

    def write(self, path: Path) -> None:
        from src.atomic_files import atomic_write_json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> "GpuCheckReport":
        return cls(**json.loads(Path(path).read_text()))


def time_skips(name: str, result) -> list:
    """What a part's result says it left out for time, as lines for the report's ``skipped_for_time``."""
    if name == "tests" and result.get("timed_out"):
        return [f"tests: killed after {result['seconds']:.0f} s, before pytest finished"]
    if name == "headline" and result.get("timed_batches", 0) < result.get("requested_batches", 0):
        return [f"headline: timed {result['timed_batches']} of {result['requested_batches']} physical batches"]
    if name in ("engines", "max-batch"):
        return [f"{name}: {row['engine']} {row['precision']}" + (f" (stopped after {len(row['tries'])} tries)"
                                                                 if row.get("stopped") == "time" else "")
                for row in result if row.get("skipped") == "time budget" or row.get("stopped") == "time"]
    return []


def part_lines(name: str, part: dict) -> list:
    """A finished part in a line or two, for the progress output and the summary."""
    result = part.get("result")
    if part["status"] != "done":
        return [f"{name}: {part['status']}: {part.get('error', '')}"]
    if name == "tests":
        return [f"tests: {result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped, "
                f"{result['errors']} errors in {result['seconds']:.0f} s"
                + (" (killed: out of time)" if result["timed_out"] else "")]
    if name == "headline":
        s = result["settings"]
        head = (f"headline ({result['data']} data, {s['engine']}, physical batch {s['physical_batch_size']} x"
                f"{s['augmult']} views, {s['attack']}-{s['pgd_steps']}): ")
        if "extrapolated" not in result:
            return [head + "not timed (out of time)"]
        e, plan = result["extrapolated"], result["plan"]
        return [head + f"{e['seconds_per_physical_batch']:.3f} s per physical batch; epoch ~{e['epoch_s'] / 60:.1f} "
                f"min; run ({plan['epochs']} epochs, {plan['steps']} steps) ~{e['run_h']:.2f} h, training only"]
    if name == "engines":
        lines = []
        for precision in dict.fromkeys(row["precision"] for row in result):
            cells = [f"{row['engine']} {row['images_per_s']:.0f}" if "images_per_s" in row else f"{row['engine']} -"
                     for row in result if row["precision"] == precision]
            lines.append(f"images/s at batch {result[0]['batch']}, {precision}: " + ", ".join(cells))
        return lines
    if name == "max-batch":
        cells = [f"{row['engine']} {row.get('largest')}" + ("+" if row.get("stopped") == "limit" else "")
                 if "stopped" in row else f"{row['engine']} -" for row in result]
        return ["largest batch (fp32, 32x32): " + ", ".join(cells)]
    return []


def summary_lines(report: GpuCheckReport) -> list:
    """A short human summary of the report: the machine, each part, and what was skipped for time."""
    env = report.environment
    lines = [f"{env.get('device')} ({env.get('device_memory_gb')} GB), torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, commit {(env.get('git_commit') or 'unknown')[:10]}, {report.wall_s or 0:.0f} s"]
    for name, part in report.parts.items():
        lines += part_lines(name, part)
    if report.skipped_for_time:
        lines.append("skipped for time: " + "; ".join(report.skipped_for_time))
    return lines


# ---------------------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class PartContext:
    """What a part may use: the flags, the device, and when it must be done (``time.monotonic``)."""

    args: object
    device: object
    deadline: float


def part_tests(ctx: PartContext):
    """The GPU tests first: if training on this device is broken, the timings below are of a broken thing."""
    return run_gpu_tests(ctx.deadline - time.monotonic())


def part_headline(ctx: PartContext):
    """What a researcher wants to know before renting for a day: how long the headline run takes."""
    return headline_slice(ctx.device, data_root=ctx.args.data_root, warmup=ctx.args.warmup,
                          batches=ctx.args.batches, deadline=ctx.deadline)


def part_engines(ctx: PartContext):
    """The engine table of README measured where it matters, fp32 and bf16."""
    return engine_throughput(ctx.device, engines=ctx.args.engines, precisions=("fp32", "bf16"),
                             batch=ctx.args.engine_batch, warmup=ctx.args.engine_warmup, steps=ctx.args.engine_steps,
                             deadline=ctx.deadline)


def part_max_batch(ctx: PartContext):
    """How large a physical batch each engine allows on this card (last: running out of memory is its method)."""
    return largest_batches(ctx.device, engines=ctx.args.engines, start=ctx.args.max_batch_start,
                           limit=ctx.args.max_batch_limit, deadline=ctx.deadline)


@dataclass(frozen=True)
class Part:
    run: Callable[[PartContext], object]
    share: float  # of the budget left when it starts, against the parts still to come


PARTS = {"tests": Part(part_tests, 0.40), "headline": Part(part_headline, 0.15),
         "engines": Part(part_engines, 0.20), "max-batch": Part(part_max_batch, 0.25)}


def run_check(args, device) -> GpuCheckReport:
    """Every requested part in registry order within the budget, the report rewritten after each."""
    budget = Budget(total_s=args.budget_s, started=args.started)
    chosen = [name for name in PARTS if name in args.parts]
    arguments = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
                 if key != "started"}
    report = GpuCheckReport(environment=environment(device), budget_s=args.budget_s, parts_requested=chosen,
                            arguments=arguments)
    say(f"{report.environment['device']}; parts {', '.join(chosen)}; budget {args.budget_s:.0f} s; "
        f"report {args.out}")
    report.write(args.out)
    for index, name in enumerate(chosen):
        now = time.monotonic()
        limit = budget.allot(PARTS[name].share, sum(PARTS[later].share for later in chosen[index + 1:]), now)
        say(f"[{name}] started (up to {limit:.0f} s)")
        record = {"limit_s": round(limit, 1)}
        try:
            record["result"] = PARTS[name].run(PartContext(args=args, device=device, deadline=now + limit))
            record["status"] = "done"
            report.skipped_for_time += time_skips(name, record["result"])
        except Exception as error:  # noqa: BLE001 -- recorded; the other parts still run
            record.update(status="failed", error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc().splitlines()[-20:])
            release_memory(device)
        record["seconds"] = round(time.monotonic() - now, 2)
        report.parts[name] = record
        report.wall_s = round(time.monotonic() - args.started, 2)
        report.write(args.out)
        say(f"[{name}] {record['status']} in {record['seconds']:.1f} s")
        for line in part_lines(name, record):
            say(f"  {line}")
    report.complete = True
    report.wall_s = round(time.monotonic() - args.started, 2)
    report.write(args.out)
    return report


# ---------------------------------------------------------------------------------------------------- command line


def build_parser():
    """One-line errors (``src.cli.OneLineErrorParser``), like ``vision.py``."""
    import argparse

    from src.cli import OneLineErrorParser
    from src.config import DATA_ROOT_ENV, SETTINGS
    from src.engines import ENGINE_NAMES

    def positive(kind):
        def parse(text):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
            if value <= 0:
                raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
            return value
        return parse

    def names(known, what):
        def parse(text):
            chosen = tuple(name.strip() for name in text.split(",") if name.strip())
            unknown = [name for name in chosen if name not in known]
            if unknown or not chosen:
                raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose "
                                                 f"from {', '.join(known)}")
            return chosen
        return parse

    parser = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the JSON report (default: benchmarks/results_gpu.json)")
    parser.add_argument("--parts", type=names(tuple(PARTS), "part"), default=tuple(PARTS),
                        help=f"comma-separated parts to run (default: {','.join(PARTS)})")
    parser.add_argument("--budget-s", type=positive(float), default=480.0,
                        help="wall-clock seconds for everything (default: %(default)s)")
    parser.add_argument("--data-root", default=os.environ.get(DATA_ROOT_ENV) or SETTINGS["data_root"].default,
                        help=f"where CIFAR-10 is (default: ${DATA_ROOT_ENV} or ./data, as vision.py); synthetic "
                             "images of the same shape when it is not there")
    parser.add_argument("--warmup", type=positive(int), default=3, help="headline: untimed physical batches first")
    parser.add_argument("--batches", type=positive(int), default=10, help="headline: timed physical batches")
    parser.add_argument("--engines", type=names(ENGINE_NAMES, "engine"), default=ENGINE_NAMES,
                        help="engines and max-batch: comma-separated engines (default: all)")
    parser.add_argument("--engine-batch", type=positive(int), default=256, help="engines: batch (default 256)")
    parser.add_argument("--engine-warmup", type=positive(int), default=2, help="engines: untimed steps first")
    parser.add_argument("--engine-steps", type=positive(int), default=5, help="engines: timed steps")
    parser.add_argument("--max-batch-start", type=positive(int), default=16, help="max-batch: first batch tried")
    parser.add_argument("--max-batch-limit", type=positive(int), default=2 ** 15,
                        help="max-batch: largest batch tried (default %(default)s)")
    return parser


def main(argv=None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    args.started = started
    import warnings

    import torch

    warnings.simplefilter("ignore", UserWarning)  # Opacus's notes on every engine it builds; not results

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr, flush=True)
        return 2
    report = run_check(args, torch.device("cuda"))
    for line in summary_lines(report):
        print(line, flush=True)
    return 0 if all(part["status"] == "done" for part in report.parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
