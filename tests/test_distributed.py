"""Multi-process DP training (``src.distributed``) on this CPU: 2 processes over gloo.

- one distributed step of every engine equals the single-process step over the union of the ranks' batches
  (noise 0, float64), and leaves the ranks' weights identical;
- with noise, the summed update carries sigma^2 C^2 of variance per coordinate once, not once per rank;
- each rank's Poisson sampler covers its shard at the global rate, and the shards partition the set;
- torchrun end to end: epsilon and the accountant's steps equal the single-process run's; a killed 2-process
  run resumes bit for bit; a resume with another number of processes is refused in one line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from src import mnist
from src.accounting import plan_privacy
from src.config import build_config
from src.data import ImageTensorDataset
from src.distributed import SINGLE_PROCESS, Ranks, ShardedPoissonLoader
from src.engines import PRIVATE_ENGINES
from src.loop import _physical_step
from src.privacy import attach
from tests.cli_process import spawn_ranks
from tests.conftest import REPO, run_cli

WORLD = 2
N_EXAMPLES = 8
ENGINES = list(PRIVATE_ENGINES) + ["non-private"]


def _examples():
    generator = torch.Generator().manual_seed(3)
    images = (torch.rand(N_EXAMPLES, 1, 28, 28, generator=generator) * 255).round().to(torch.uint8)
    return ImageTensorDataset(images, torch.randint(0, 10, (N_EXAMPLES,), generator=generator))


def _one_step(engine: str, rows: list, ranks: Ranks, noise: float, clip: float = 0.05) -> dict:
    """Weight change of one DP-SGD step (SGD, lr 1, float64) on ``rows`` of the examples, through attach() and
    the training loop's physical step, in physical batches of 2."""
    config = build_config({"dataset": "mnist", "engine": engine, "noise": None if engine == "non-private" else 1.0,
                           "clip": clip, "batch_size": N_EXAMPLES, "physical_batch_size": 2, "lr": 1.0,
                           "momentum": 0.0, "epochs": 1}, mnist.DATASET.defaults)
    data = _examples()
    plan = plan_privacy(config, len(data))
    if plan.private:
        plan = dataclasses.replace(plan, noise_multiplier=noise)
    torch.manual_seed(0)
    model = mnist.DATASET.build_model(config.model).double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    training = attach(model, data, config, plan, sampling_generator=torch.Generator().manual_seed(0),
                      noise_generator=torch.Generator().manual_seed(7), ranks=ranks)
    training.optimizer.zero_grad()
    starts = list(range(0, len(rows), 2))
    for start in starts:
        x, y = data.__getitems__(rows[start:start + 2])
        training.optimizer.signal_skip_step(do_skip=start != starts[-1])
        _physical_step(training, x.double(), y)
    after = dict(training.base_model.named_parameters())
    return {k: before[k] - after[k].detach() for k in before}


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        ranks = Ranks(rank=rank, world_size=WORLD)
        shard = list(range(rank, N_EXAMPLES, WORLD))
        results = {}
        for engine in ENGINES:
            results[engine] = _one_step(engine, shard, ranks, noise=0.0)
            if rank == 0:
                results[f"{engine}/single"] = _one_step(engine, list(range(N_EXAMPLES)), SINGLE_PROCESS, noise=0.0)
        for engine in ("bk", "hooks"):
            results[f"{engine}/noisy"] = _one_step(engine, shard, ranks, noise=1.0, clip=1.0)
            results[f"{engine}/noise-free"] = _one_step(engine, shard, ranks, noise=0.0, clip=1.0)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_steps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    spawn_ranks(_worker, (str(folder / "store"), str(folder)), WORLD)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_distributed_step_equals_single_process_step_over_the_union(engine, distributed_steps):
    rank0, rank1 = distributed_steps
    single = rank0[f"{engine}/single"]
    for name, expected in single.items():
        assert expected.abs().max() > 0, f"{engine}: {name} did not move; the comparison would prove nothing"
        assert torch.equal(rank0[engine][name], rank1[engine][name]), f"{engine}: ranks' weights differ ({name})"
        assert torch.allclose(rank0[engine][name], expected, rtol=1e-9, atol=1e-13), f"{engine}: {name}"


@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_noise_is_added_once_for_the_whole_step(engine, distributed_steps):
    """sigma = C = 1, expected batch 8, lr 1: (noisy - noise-free update) * 8 is the noise of the step. Its
    variance per coordinate is 1 if rank 0 alone adds noise, 2 if both ranks did (LeNet-5: 61706 coordinates,
    so the estimate's standard error is 0.6%)."""
    rank0, rank1 = distributed_steps
    noise = torch.cat([((rank0[f"{engine}/noisy"][k] - rank0[f"{engine}/noise-free"][k]) * N_EXAMPLES).flatten()
                       for k in rank0[f"{engine}/noisy"]])
    assert noise.numel() > 60000
    assert 0.95 < noise.var().item() < 1.05
    for name in rank0[f"{engine}/noisy"]:
        assert torch.equal(rank0[f"{engine}/noisy"][name], rank1[f"{engine}/noisy"][name])


def _shard_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        data = ImageTensorDataset(torch.zeros(101, 1, 2, 2, dtype=torch.uint8), torch.zeros(101))
        loader = ShardedPoissonLoader(data, sample_rate=0.2, steps=400,
                                      generator=torch.Generator().manual_seed(rank + 1), collate_fn=lambda b: b)
        torch.save([list(batch) for batch in loader.batch_sampler], os.path.join(out, f"shard{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_samples_its_shard_at_the_global_rate(tmp_path):
    spawn_ranks(_shard_worker, (str(tmp_path / "store"), str(tmp_path)), WORLD)
    batches = [torch.load(tmp_path / f"shard{r}.pt") for r in range(WORLD)]
    assert all(len(b) == 400 for b in batches), "every rank draws the plan's steps, empty batches included"
    seen = [set(i for batch in b for i in batch) for b in batches]
    assert seen[0] | seen[1] == set(range(101)) and not seen[0] & seen[1], "the shards partition the set"
    counts = torch.zeros(101)
    for b in batches:
        for batch in b:
            counts[batch] += 1
    rate = counts / 400  # each example's inclusion frequency: 0.2 +- 0.02 (binomial, 400 draws)
    assert (rate - 0.2).abs().max() < 0.1 and abs(rate.mean().item() - 0.2) < 0.01
    union = [len(a) + len(b) for a, b in zip(*batches)]
    assert abs(sum(union) / 400 - 0.2 * 101) < 1.0, "the union's mean size is q * n"
    together = sum(bool(set(a) & {0}) and bool(set(b) & {1}) for a, b in zip(*batches))
    assert together < 40, "examples 0 and 1 (different ranks) are drawn independently (expected 16 of 400)"


def _torchrun(*args, cwd, nproc: int = WORLD, script=None, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [str(script or REPO / "vision.py"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _flags(root, out, run_id):
    """Public BatchNorm and robust (FGSM-RS) training too: each rank refreshes the same public statistics and
    attacks its own examples."""
    return ["--dataset", "mnist", "--data-root", root, "--train-subset", 240, "--batch-size", 32,
            "--physical-batch-size", 16, "--epochs", 3, "--noise", 1.0, "--wandb", "disabled", "--out", out,
            "--run-id", run_id, "--checkpoint-every", 3, "--eval-robust-size", 10, "--seed", 0,
            "--norm", "bn-public", "--robust", "--attack", "fgsm-rs"]


# vision.py under torchrun, with rank 0 SIGKILLed at the start of its KILL_AT-th physical batch (torchrun then
# stops the other rank), as when a scheduler kills a job.
KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import src.loop as loop
original, calls = loop._physical_step, [0]
def physical_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {kill_at} and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
loop._physical_step = physical_step
import vision
sys.exit(vision.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_epsilon_resume_and_world_size(tiny_root, tmp_path):
    from src import checkpoint

    single = run_cli(*_flags(tiny_root, tmp_path, "single"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    reference = _torchrun(*_flags(tiny_root, tmp_path, "uninterrupted"), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    assert reference.stdout.count("finished:") == 1, "rank 0 alone reports"
    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    two = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())
    for key in ("epsilon", "epsilon_by_accountant", "steps", "sample_rate", "noise_multiplier"):
        assert one[key] == two[key], key
    saved = checkpoint.load(tmp_path / "uninterrupted")
    assert saved["world_size"] == WORLD and len(saved["accountant_history"]) == 1
    assert saved["accountant_history"] == checkpoint.load(tmp_path / "single")["accountant_history"]

    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN.format(repo=str(REPO), kill_at=12))
    killed = _torchrun(*_flags(tiny_root, tmp_path, "killed"), cwd=tmp_path, script=script)
    assert killed.returncode != 0
    killed_dir = tmp_path / "killed"
    position = checkpoint.position_of(checkpoint.load(killed_dir))
    assert position.step > 0, "the kill must come after a checkpoint"

    refused = run_cli("--resume", killed_dir, cwd=tmp_path)  # one process, without torchrun
    assert refused.returncode == 2 and "trained with 2 process(es), this resume has 1" in refused.stderr

    resumed = _torchrun("--resume", killed_dir, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = torch.load(tmp_path / "uninterrupted" / "model.pt"), torch.load(killed_dir / "model.pt")
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epsilon"] == two["epsilon"]
    assert summary["test_acc"] == two["test_acc"] and summary["robust_acc"] == two["robust_acc"]

