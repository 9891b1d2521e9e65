"""One training loop for both datasets and every engine: Poisson batches, DP step, evaluation, logging."""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from opacus.utils.batch_memory_manager import BatchMemoryManager
from tqdm import tqdm

from attacks.adversarial import AdversarialBatches
from attacks.robust_eval import masking_checks, robust_accuracy
from dp_layers import has_public_batchnorm, refresh_public_statistics
from src import datasets as dataset_registry
from src.config import Config, ModelConfig
from src.data import DatasetSpec, PublicData
from src.errors import TrainingStopped, UserError
from src.accounting import GDP_NOTE, PrivacyPlan, epsilon_by_accountant, epsilon_from_history, plan_privacy
from src.privacy import Training, attach
from src.tracking import RunDirectory, WandbRun, check_wandb_mode, git_commit, new_run_id, recording_outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seeds:
    """Independent streams from one ``--seed``: changing the engine or noise never shifts the batches."""

    model: int
    sampling: int
    noise: int
    attack: int  # random starts and --adv-ratio draws of robust training
    evaluation: int  # random starts of robust evaluation


def derive_seeds(seed: int) -> Seeds:
    streams = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(5))
    return Seeds(*streams)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int
    steps: int


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, *, batch_size: int, device: torch.device) -> tuple:
    """(mean cross-entropy, accuracy in %) over ``dataset`` in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for images, labels in dataset.batches(batch_size):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
    finally:
        model.train(was_training)
    return total_loss / len(dataset), 100.0 * correct / len(dataset)


def _physical_step(training: Training, images: torch.Tensor, labels: torch.Tensor,
                   adversarial: Optional[AdversarialBatches] = None) -> tuple:
    """Forward/backward on one physical batch and ``optimizer.step()`` (a real step only at the end of a
    logical batch). With ``adversarial`` (robust training) the batch is first attacked against the current
    weights. Returns the batch's summed loss and correct count (on the inputs trained on), for logging."""
    if adversarial is not None:
        images = adversarial(training.model, images, labels)
    training.optimizer.zero_grad()
    logits = training.model(images)
    training.criterion(logits, labels).backward()
    training.optimizer.step()
    logits = logits.detach()
    return (F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0,
            (logits.argmax(dim=1) == labels).sum().item())


def train_epoch(training: Training, *, physical_batch_size: int, device: torch.device, epoch: int,
                epochs: int, steps_per_epoch: int, first_step: int,
                refresh_public: Optional[Callable[[], None]] = None, refresh_every: int = 1,
                adversarial: Optional[AdversarialBatches] = None) -> EpochStats:
    """One pass of Poisson-sampled logical batches, split into physical batches by BatchMemoryManager.

    ``refresh_public`` (bn-public models) recomputes the public BatchNorm statistics before the first
    physical batch of every ``refresh_every``-th logical batch, so each step normalizes with statistics
    of the current weights.
    """
    training.model.train()
    loss_sum, correct, examples, steps = 0.0, 0, 0, 0
    starts_logical_batch = True
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False,
               dynamic_ncols=True, disable=None, file=sys.stderr)
    # torch notes that the first layer's full backward hook sees no input gradient (inputs are data):
    # expected under Opacus's hooks, and only noise in the output.
    with warnings.catch_warnings(), bar, BatchMemoryManager(
            data_loader=training.train_loader, max_physical_batch_size=physical_batch_size,
            optimizer=training.optimizer) as physical_batches:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for images, labels in physical_batches:
            if refresh_public is not None and starts_logical_batch and (first_step + steps) % refresh_every == 0:
                refresh_public()
            batch_loss, batch_correct = _physical_step(training, images.to(device), labels.to(device), adversarial)
            if not math.isfinite(batch_loss):
                raise TrainingStopped("diverged", f"training loss became {batch_loss} at step "
                                      f"{first_step + steps + 1} (epoch {epoch}); lower --lr or --clip")
            loss_sum, correct, examples = loss_sum + batch_loss, correct + batch_correct, examples + len(labels)
            starts_logical_batch = training.took_step()
            if starts_logical_batch:
                steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(examples, 1):.3f}",
                                acc=f"{100.0 * correct / max(examples, 1):.1f}%", refresh=False)
    return EpochStats(loss=loss_sum / max(examples, 1), accuracy=100.0 * correct / max(examples, 1),
                      examples=examples, steps=steps)


def public_refresher(training: Training, public: Optional[PublicData],
                     device: torch.device) -> Optional[Callable[[], None]]:
    """For bn-public models: a call that recomputes the public BatchNorm statistics for the current weights."""
    if not has_public_batchnorm(training.base_model):
        return None
    public_images = public.images.float().div(255).to(device)
    return functools.partial(refresh_public_statistics, training.base_model, public_images)


def _describe(config: Config, plan: PrivacyPlan, run_dir: RunDirectory) -> str:
    privacy = "non-private (no clipping, no noise)"
    if plan.private:
        how = f"calibrated for epsilon {config.privacy.target_epsilon:g}" if plan.noise_calibrated else "given"
        privacy = (f"noise {plan.noise_multiplier:.4g} ({how}), clip {config.privacy.clip:g}, "
                   f"{config.privacy.accountant} accountant, delta {plan.delta:g}")
    return (f"run {run_dir.path}: {config.data.dataset}, norm {config.model.norm}, act {config.model.act}, "
            f"engine {config.privacy.engine}; n={plan.n_train}, batch {plan.batch_size} (q={plan.sample_rate:.5f}), "
            f"{plan.epochs} epoch(s) x {plan.steps_per_epoch} steps; {privacy}")


def run(config: Config, spec: DatasetSpec) -> dict:
    """Train one configuration end to end and return its summary (also written to summary.json).

    Everything that can be refused (data, privacy plan, output folder) is checked before the run
    directory exists, so a bad request leaves nothing behind.
    """
    started = time.time()
    device = resolve_device(config.train.device)
    check_wandb_mode(config.output.wandb)
    data = spec.load(config.data, dataset_registry.needs_public_data(config))
    plan = plan_privacy(config, n_train=len(data.train))
    for note in data.notes:
        log.warning("%s", note)
    seeds = derive_seeds(config.train.seed)
    torch.manual_seed(seeds.model)
    model = spec.build_model(config.model).to(device)
    noise_generator = None
    if plan.private:
        noise_generator = torch.Generator(device=device)
        noise_generator.manual_seed(seeds.noise)
    training = attach(model, data.train, config, plan,
                      sampling_generator=torch.Generator().manual_seed(seeds.sampling),
                      noise_generator=noise_generator)
    refresh_public = public_refresher(training, data.public, device)
    robust = config.robust
    adversarial = None
    if robust.robust:
        attack_generator = torch.Generator(device=device).manual_seed(seeds.attack)
        adversarial = AdversarialBatches(robust.train_attack(), robust.adv_ratio, attack_generator)
    transfer_source = load_run_model(robust.transfer_from, spec, device) if robust.transfer_from else None

    run_dir = RunDirectory.create(config.output.out, config.output.run_id or new_run_id(config))
    record = {**config.to_dict(), "run_id": run_dir.run_id, "git_commit": git_commit(), "plan": plan.to_dict(),
              "data_notes": data.notes, "public_data": data.public.source if data.public else None,
              "n_test": len(data.test), "device": str(device)}
    run_dir.write_config(record)
    summary = {"run_id": run_dir.run_id, "status": "running", "reason": None, "dataset": config.data.dataset,
               "norm": config.model.norm, "engine": config.privacy.engine, "accountant": config.privacy.accountant,
               "delta": plan.delta, "noise_multiplier": plan.noise_multiplier, "n_train": plan.n_train,
               "sample_rate": plan.sample_rate, "epochs": 0, "steps": 0, "train_loss": None, "train_acc": None,
               "test_loss": None, "test_acc": None, "epsilon": None if plan.private else math.inf,
               "epsilon_by_accountant": None, "robust": robust.robust, "robust_acc": None,
               "eval_attack": robust.eval_attack().to_dict() if robust.eval_robust_size else None,
               "eval_robust_size": robust.eval_robust_size,
               "train_attack": robust.train_attack().to_dict() if robust.robust else None,
               "adv_ratio": robust.adv_ratio if robust.robust else None, "wall_seconds": 0.0}
    run_dir.write_summary(summary)
    tracker = WandbRun.start(mode=config.output.wandb, project=config.output.wandb_project,
                             group=config.output.wandb_group, run_dir=run_dir.path, run_id=run_dir.run_id,
                             config=record, tags=[config.data.dataset, f"norm:{config.model.norm}",
                                                  f"engine:{config.privacy.engine}",
                                                  f"noise:{plan.noise_multiplier}",
                                                  f"robust:{robust.robust}"])
    summary["wandb"] = tracker.directory or tracker.error
    print(_describe(config, plan, run_dir), flush=True)
    if plan.private and config.privacy.accountant == "gdp":
        print(f"note: {GDP_NOTE}", flush=True)
    if robust.robust:
        print(f"robust training: {robust.train_attack().describe()} on {100 * robust.adv_ratio:g}% of each batch; "
              f"robust accuracy: {robust.eval_attack().describe()} on {robust.eval_robust_size} test images",
              flush=True)

    try:
        with recording_outcome(summary):
            step = 0
            for epoch in range(1, config.train.epochs + 1):
                epoch_started = time.time()
                stats = train_epoch(training, physical_batch_size=config.train.physical_batch_size, device=device,
                                    epoch=epoch, epochs=config.train.epochs, steps_per_epoch=plan.steps_per_epoch,
                                    first_step=step, refresh_public=refresh_public,
                                    refresh_every=config.train.public_refresh_every, adversarial=adversarial)
                step += stats.steps
                if refresh_public is not None:
                    refresh_public()  # evaluate and save with the statistics of the final weights
                test_loss, test_acc = evaluate(training.model, data.test, batch_size=config.train.eval_batch_size,
                                               device=device)
                epsilon = (epsilon_from_history(config.privacy.accountant, training.history(), plan.delta)
                           if plan.private else math.inf)
                train_seconds = time.time() - epoch_started
                robust_acc = None
                if robust.eval_robust_size and (epoch % robust.eval_robust_every == 0 or epoch == config.train.epochs):
                    robust_acc = robust_accuracy(training.model, data.test, robust.eval_attack(),
                                                 size=robust.eval_robust_size, batch_size=config.train.eval_batch_size,
                                                 device=device, seed=seeds.evaluation)
                    summary["robust_acc"] = robust_acc
                row = {"epoch": epoch, "step": step, "train_loss": stats.loss, "train_acc": stats.accuracy,
                       "test_loss": test_loss, "test_acc": test_acc, "robust_acc": robust_acc, "epsilon": epsilon,
                       "seconds": time.time() - epoch_started, "train_seconds": train_seconds}
                run_dir.append_metrics(row)
                run_dir.save_model(training.base_model.state_dict())
                tracker.log(row, step=step)
                summary.update(epochs=epoch, steps=step, train_loss=stats.loss, train_acc=stats.accuracy,
                               test_loss=test_loss, test_acc=test_acc, epsilon=epsilon,
                               wall_seconds=time.time() - started)
                run_dir.write_summary(summary)
                eps_text = f"eps {epsilon:.3f} ({config.privacy.accountant})" if plan.private else "non-private"
                robust_text = f"  robust {robust_acc:.2f}%" if robust_acc is not None else ""
                tqdm.write(f"epoch {epoch}/{config.train.epochs}  loss {stats.loss:.4f}  train {stats.accuracy:.2f}%  "
                           f"test {test_acc:.2f}%{robust_text}  {eps_text}  {row['seconds']:.1f}s", file=sys.stdout)
                if not math.isfinite(test_loss):
                    raise TrainingStopped("diverged", f"test loss became {test_loss} after epoch {epoch}; lower --lr")
            if robust.masking_checks or transfer_source is not None:
                summary["masking_checks"] = run_masking_checks(training.model, data.test, config, device,
                                                               seeds.evaluation, summary["robust_acc"],
                                                               transfer_source)
                run_dir.write_summary(summary)
    finally:
        if plan.private:
            summary["epsilon_by_accountant"] = epsilon_by_accountant(training.history(), plan.delta)
        summary["wall_seconds"] = time.time() - started
        run_dir.write_summary(summary)
        tracker.finish(summary, exit_code=exit_code_for(summary))
    if summary["status"] == "finished":
        by_acc = summary["epsilon_by_accountant"] or {}
        extra = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in by_acc.items())
        robust_text = (f", robust accuracy {summary['robust_acc']:.2f}% ({robust.eval_attack().describe()})"
                       if summary["robust_acc"] is not None else "")
        print(f"finished: test accuracy {summary['test_acc']:.2f}%{robust_text}"
              + (f", epsilon {summary['epsilon']:.3f} at delta {plan.delta:g} ({extra})" if plan.private else "")
              + f"; {run_dir.path}", flush=True)
    return summary


def load_run_model(run_path: str, spec: DatasetSpec, device: torch.device) -> torch.nn.Module:
    """The saved model of a finished run directory (its config.json says how to build it)."""
    path = Path(run_path)
    try:
        record = json.loads((path / "config.json").read_text())
        state = torch.load(path / "model.pt", map_location=device, weights_only=True)
    except FileNotFoundError as missing:
        raise UserError(f"{run_path} is not a finished run directory: "
                        f"{Path(missing.filename).name} is missing") from None
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot read the run in {run_path}: {type(error).__name__}: {error}") from None
    dataset = record.get("data", {}).get("dataset")
    if dataset != spec.name:
        raise UserError(f"the run in {run_path} trained on {dataset!r}, not --dataset {spec.name}")
    model = spec.build_model(ModelConfig(**record["model"])).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"model.pt in {run_path} does not fit its config.json: {str(error).splitlines()[0]}") from None
    return model.eval()


def run_masking_checks(model, test_set, config: Config, device: torch.device, seed: int,
                       robust_acc: Optional[float], transfer_source=None) -> dict:
    robust = config.robust
    report = masking_checks(model, test_set, robust.eval_attack(), size=robust.eval_robust_size,
                            batch_size=config.train.eval_batch_size, device=device, seed=seed,
                            source=transfer_source, baseline=robust_acc)
    if transfer_source is not None:
        report["transfer"]["source_run"] = robust.transfer_from
    curve = ", ".join(f"{p['eps']:g}: {p['robust_acc']:.1f}%" for p in report["radius_curve"])
    transfer = (f"; transferred from {robust.transfer_from}: {report['transfer']['robust_acc']:.1f}%"
                if transfer_source is not None else "")
    print(f"masking checks ({'passed' if report['passed'] else 'FAILED'}): accuracy by radius {curve}; "
          f"{report['more_steps']['steps']} steps {report['more_steps']['robust_acc']:.1f}%, "
          f"{report['more_restarts']['restarts']} restarts {report['more_restarts']['robust_acc']:.1f}%{transfer}",
          flush=True)
    return report


def exit_code_for(summary: dict) -> int:
    """0 for a finished run, 130 for an interrupted one, 1 for one that stopped or failed."""
    return {"finished": 0, "interrupted": 130}.get(summary["status"], 1)
