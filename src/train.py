"""The run lifecycle: prepare (data, plan, seeds, engine: everything refusable before a file is written),
create or resume the run directory, the epoch loop with evaluation, checkpoints before releases, and the
outcome. The loop itself is ``src.loop``; what is printed is ``src.report``."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from attacks.adversarial import AdversarialBatches
from attacks.defaults import ENSEMBLES
from attacks.robust_eval import masking_checks, robust_accuracy
from dp_layers.dp_bn import ReleasedStatistics, copy_statistics
from src.augment import AugmentedViews, FeatureViews
from src.ema import weight_average
from src import checkpoint
from src import datasets as dataset_registry
from src.accounting import (PrivacyPlan, bounded_epsilon, budget_step_limit, epsilon_after_next_step, epsilon_by_accountant,
                            epsilon_from_history, gdp_approximation, history_until, plan_privacy, steps_in)
from src.atomic_files import json_safe
from src.checkpoint import EpochProgress, Position
from src.config import Config, ModelConfig
from src.data import DatasetSpec
from src.distributed import Ranks, broadcast, current_ranks, gather, rank_stream
from src.errors import TrainingStopped, UserError
from src.feature_cache import TrainingInputs, training_inputs
from src.loop import (EpochSpec, Numerics, StepHooks, StoppedAtBoundary, evaluate, public_refresher,
                      require_finite_weights, train_epoch)
from src.preemption import Interrupted, StopNow, StopSignals
from src.progress import RunShape, TrainingProgress
from src.privacy import Training, attach, check_engine_supports
from src.private_statistics import release_line, release_statistics, restore_statistics, uses_private_statistics
from src.report import accuracy_interval, announce, epoch_line, report_outcome
from src.run_directory import FollowerRunDirectory, RunDirectory
from src.summary import RunSummary, TrainingSummary
from src.tracking import WandbRun, check_wandb_mode, git_commit, new_run_id, recording_outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seeds:
    """Independent streams from one root seed: changing the engine or noise never shifts the batches.

    The root is ``--seed`` when given (reproducible runs; the guarantee then assumes the seed stays
    secret, since with it and the other examples the noise can be replayed), else 128 bits from the
    operating system. Either way the streams are kept only in the checkpoint, which is secret material.
    """

    model: int
    sampling: int
    noise: int
    attack: int  # random starts and --adv-ratio draws of robust training
    evaluation: int  # random starts of robust evaluation
    augmentation: int = 0  # --augment's crops and flips (0 in checkpoints written before it existed)


def derive_seeds(seed: Optional[int]) -> Seeds:
    root = secrets.randbits(128) if seed is None else seed
    # Child i of a SeedSequence depends on i only, so a stream added later leaves the earlier ones unchanged.
    streams = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(root).spawn(6))
    return Seeds(*streams)


def rank_seeds(seeds: Seeds, ranks: Ranks) -> Seeds:
    """This rank's streams in a multi-process run (``src.distributed``): its own Poisson sampling of its shard,
    attack starts and augmentations; the model, noise (only rank 0 adds any) and evaluation streams shared.
    One process: the seeds unchanged."""
    return dataclasses.replace(seeds, sampling=rank_stream(seeds.sampling, ranks),
                               attack=rank_stream(seeds.attack, ranks),
                               augmentation=rank_stream(seeds.augmentation, ranks))


def resolve_device(name: str, ranks: Optional[Ranks] = None) -> torch.device:
    """The training device; with several processes on CUDA, this rank's GPU (torchrun's LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    if name == "cuda" and ranks is not None and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


@dataclass
class PreparedRun:
    """A run ready to train: its config, data, privacy plan, seeds and the engine around the model (what
    ``_prepare`` builds, everything that can be refused before a file is written)."""

    config: Config
    device: torch.device
    data: object
    plan: PrivacyPlan
    seeds: Seeds
    training: Training
    generators: dict
    adversarial: Optional[AdversarialBatches]
    refresh_public: Optional[Callable[[], None]]
    views: Optional[AugmentedViews] = None  # --augment (and --augmult), --mirror-views: the rows of a batch
    ema: Optional[AveragedModel] = None  # --ema: the average of the weights (src.ema)
    refresh_ema: Optional[Callable[[], None]] = None  # its public BatchNorm statistics (bn-public)
    ranks: Ranks = Ranks()  # this process's place in a multi-process run (src.distributed)
    numerics: Numerics = Numerics()  # --precision, --channels-last: how a training step computes
    stop: Optional[StopSignals] = None  # SIGTERM / SIGINT while training (src.preemption)
    hooks: StepHooks = StepHooks()  # instruments around each step (the white-box audit's canaries)
    progress: Optional[TrainingProgress] = None  # the bar, the estimate and the heartbeat (src.progress)
    inputs: Optional[TrainingInputs] = None  # what training and clean evaluation read: the sets or their features
    released_statistics: Optional[ReleasedStatistics] = None  # --norm bn-dp's, when this process released them


@dataclass
class RunSession(PreparedRun):
    """A prepared run in its run directory, so the epoch loop, checkpoints and resume share one object."""

    run_dir: Optional[RunDirectory] = None
    summary: Optional[TrainingSummary] = None
    # n and the fingerprints of the private, validation and public sets: kept in the checkpoint only (secret)
    data_identity: dict = dataclasses.field(default_factory=dict)
    step_limit: Optional[int] = None  # --max-epsilon: stop before this step (from the accountant's history)
    tracker: Optional[WandbRun] = None

    def save_checkpoint(self, position: Position, streams: Optional[dict] = None) -> None:
        """Every rank calls it at the same step (it gathers their random streams, or ``streams`` taken at that
        step); rank 0 writes the file."""
        require_finite_weights(self.training.base_model)
        rank_streams = gather(streams or checkpoint.rank_streams(self.generators))
        if not self.ranks.is_main:
            return
        checkpoint.save(self.run_dir.path, checkpoint.capture(
            model=self.training.base_model, optimizer=self.training.optimizer.original_optimizer,
            history=self.training.history(), generators=self.generators, position=position,
            metrics=self.run_dir.metrics, summary=self.summary.to_dict(), seeds=dataclasses.asdict(self.seeds),
            data_identity=self.data_identity, ema=self.ema, streams_by_rank=rank_streams))


def _prepare(config: Config, spec: DatasetSpec, seeds: Optional[Seeds] = None,
             saved_model: Optional[dict] = None) -> PreparedRun:
    """Data, privacy plan, model and engine: everything that can be refused, before any file is written.
    ``seeds`` (a resumed run's, from its checkpoint) default to new ones from ``--seed`` or the OS (rank 0's,
    in a multi-process run). The data sets move to the training device once, as uint8 tensors: batches are
    gathered (and augmented) there. --norm bn-dp's statistics are released here, before the first step, or
    taken from a resumed run's ``saved_model`` (src.private_statistics)."""
    ranks = current_ranks()
    device = resolve_device(config.train.device, ranks)
    check_wandb_mode(config.output.wandb)
    data = spec.load(config.data, dataset_registry.needs_public_data(config))
    plan = plan_privacy(config, n_train=data.schedule_size or len(data.train))
    for note in data.notes:
        log.warning("%s", note)
    data = data.to(device)
    seeds = seeds or broadcast(derive_seeds(config.train.seed))
    own = rank_seeds(seeds, ranks)
    torch.manual_seed(own.model)
    numerics = Numerics(precision=config.train.precision, channels_last=config.train.channels_last)
    model = spec.build_model(config.model).to(device)
    if numerics.channels_last:
        model = model.to(memory_format=torch.channels_last)
    noise_generator = None
    if plan.private:
        noise_generator = torch.Generator(device=device)
        noise_generator.manual_seed(own.noise)
    sampling_generator = torch.Generator().manual_seed(own.sampling)
    inputs = training_inputs(model, data, config, spec.name, device)  # cached features where they can be
    training = attach(model, inputs.train, config, plan, sampling_generator=sampling_generator,
                      noise_generator=noise_generator, ranks=ranks)
    refresh_public = public_refresher(model, data.public, device)
    if refresh_public is not None:
        refresh_public()  # no step happens before it anyway; the engine's check below needs the statistics
    released = None
    if uses_private_statistics(config):
        if saved_model is not None:
            restore_statistics(model, saved_model)
        else:
            released = release_statistics(
                model, data, config, spec.name, device, n=plan.n_train, ranks=ranks,
                features=inputs.train.first_view() if inputs.cached else None,
                generator=(training.privacy_engine.secure_rng if config.privacy.secure_rng else noise_generator)
                if plan.private else torch.Generator(device=device).manual_seed(own.noise))
    check_engine_supports(training, inputs.train)
    generators = {"sampling": sampling_generator, "noise": noise_generator}
    if config.privacy.secure_rng:  # a CSPRNG has no state to keep: resumed secure runs are not replays
        generators = {}
    robust = config.robust
    adversarial = None
    if robust.robust:
        generators["attack"] = torch.Generator(device=device).manual_seed(own.attack)
        adversarial = AdversarialBatches(robust.train_attack(), robust.adv_ratio, generators["attack"])
    with torch.random.fork_rng(devices=[]):  # leaves the global random stream as it was
        ema = weight_average(spec.build_model(config.model).to(device), config.train.ema)
    refresh_ema = public_refresher(ema.module, data.public, device) if ema is not None else None
    if ema is not None and uses_private_statistics(config):
        copy_statistics(model, ema.module)  # the same release; a resumed run's average is restored with it
    views = None
    if config.train.augment:
        generators["augmentation"] = torch.Generator(device=device).manual_seed(own.augmentation)
        views = AugmentedViews(spec.augmentation, config.train.augmult, generators["augmentation"])
    elif inputs.cached and inputs.train.views > 1:  # --mirror-views
        views = FeatureViews(inputs.train.views)
    return PreparedRun(config=config, device=device, data=data, plan=plan, seeds=seeds, training=training,
                       generators=generators, adversarial=adversarial, refresh_public=refresh_public, views=views,
                       ema=ema, refresh_ema=refresh_ema, ranks=ranks, numerics=numerics, inputs=inputs,
                       released_statistics=released)


def _new_summary(config: Config, plan: PrivacyPlan, run_dir: RunDirectory) -> TrainingSummary:
    """A new run's summary (``src.summary``): the plan and settings now, the numbers as epochs finish."""
    robust = config.robust
    return TrainingSummary(
        run_id=run_dir.run_id, dataset=config.data.dataset, norm=config.model.norm, engine=config.privacy.engine,
        accountant=config.privacy.accountant, delta=plan.delta, noise_multiplier=plan.noise_multiplier,
        n_train=plan.n_train, sample_rate=plan.sample_rate, epsilon=None if plan.private else math.inf,
        unprotected_train_stats=config.output.unprotected_train_stats, max_epsilon=plan.max_epsilon,
        budget_steps=plan.budget_steps, robust=robust.robust,
        eval_attack=robust.eval_attack_spec().to_dict() if robust.eval_robust_size else None,
        eval_robust_size=robust.eval_robust_size,
        train_attack=robust.train_attack().to_dict() if robust.robust else None,
        adv_ratio=robust.adv_ratio if robust.robust else None)


@dataclass
class Start:
    """Where a run starts: a new run directory at epoch 0, or a resumed one at its checkpoint."""

    run_dir: RunDirectory
    summary: TrainingSummary
    position: Position = dataclasses.field(default_factory=Position)
    sampling_state: Optional[torch.Tensor] = None  # the sampler's state mid-epoch, to replay its batches
    previous_seconds: float = 0.0  # wall time before the resume


def _begin(prepared: PreparedRun) -> Start:
    """A new run: its directory, config.json and a fresh summary (rank 0 creates them and tells the other
    ranks the run id, or why it could not)."""
    config, plan, data = prepared.config, prepared.plan, prepared.data
    created = None
    if prepared.ranks.is_main:
        try:
            run_dir = RunDirectory.create(config.output.out, config.output.run_id or new_run_id(config))
            created = {"run_id": run_dir.run_id}
        except UserError as error:
            created = {"error": str(error)}
            broadcast(created)
            raise
    created = broadcast(created)
    if "error" in created:
        raise UserError(created["error"])
    if not prepared.ranks.is_main:
        run_dir = FollowerRunDirectory(Path(config.output.out) / created["run_id"])
    run_dir.write_config({**config.to_dict(), "run_id": run_dir.run_id, "git_commit": git_commit(),
                          "plan": plan.to_dict(), "data_notes": data.notes,
                          "public_data": data.public.source if data.public else None,
                          "public_images_used": len(data.public.images) if data.public else None,
                          "n_test": len(data.test), "device": str(prepared.device),
                          "processes": prepared.ranks.world_size})
    return Start(run_dir=run_dir, summary=_new_summary(config, plan, run_dir))


def _continue(prepared: PreparedRun, saved: dict) -> Start:
    """A resumed run: weights, optimizer, accountant and generators from the checkpoint; metrics cut back to
    it (the steps after it are redone); the summary it had, marked running again."""
    training, config, ranks = prepared.training, prepared.config, prepared.ranks
    run_dir = (RunDirectory if ranks.is_main else FollowerRunDirectory)(Path(config.output.out) / config.output.run_id)
    checkpoint.restore(saved, model=training.base_model, optimizer=training.optimizer.original_optimizer,
                       accountant=training.privacy_engine.accountant if training.privacy_engine else None,
                       generators=prepared.generators, ema=prepared.ema, rank=ranks.rank)
    position = checkpoint.position_of(saved)
    run_dir.metrics = list(saved["metrics"])
    run_dir.rewrite_metrics()  # drop rows written after the checkpoint: those steps are redone
    if position.partial is None and position.epoch:
        run_dir.save_model(saved["model"])  # the checkpointed epoch's model, if a kill came before its save
    summary = TrainingSummary.from_dict(saved["summary"])
    summary.update(status="running", reason=None, resumed=summary.resumed + 1)
    return Start(run_dir=run_dir, summary=summary, position=position,
                 sampling_state=(checkpoint.streams_of(saved, ranks.rank)["generators"].get("sampling")
                                 if position.partial is not None else None),
                 previous_seconds=summary.wall_seconds or 0.0)


def run(config: Config, spec: DatasetSpec, resume: bool = False,
        hooks: Optional[StepHooks] = None) -> TrainingSummary:
    """Train one configuration end to end and return its summary (also written to summary.json).

    Everything that can be refused (data, privacy plan, output folder) is checked before the run
    directory exists, so a bad request leaves nothing behind. With ``resume`` the run directory named by
    the config exists and the run continues from its checkpoint (``src.checkpoint``). ``hooks`` are called
    around every step (``src.loop.StepHooks``; the white-box audit's gradient canaries).
    """
    started = time.time()
    saved = checkpoint.load(Path(config.output.out) / config.output.run_id) if resume else None
    prepared = _prepare(config, spec, Seeds(**saved["seeds"]) if resume else None,
                        saved_model=saved["model"] if resume else None)
    prepared.hooks = hooks or StepHooks()
    device, data, plan, seeds, training = (prepared.device, prepared.data, prepared.plan, prepared.seeds,
                                           prepared.training)
    identity = checkpoint.data_identity(data)
    if resume:
        run_path = Path(config.output.out) / config.output.run_id
        checkpoint.require_same_data(saved, identity, run_path)
        checkpoint.require_resumable_here(saved, prepared.ranks.world_size, prepared.generators, run_path)
    robust = config.robust
    transfer_source = load_run_model(robust.transfer_from, spec, device) if robust.transfer_from else None
    start = _continue(prepared, saved) if resume else _begin(prepared)
    run_dir, summary, position = start.run_dir, start.summary, start.position
    run_dir.write_summary(summary)
    session = RunSession(**vars(prepared), run_dir=run_dir, summary=summary, data_identity=identity,
                         step_limit=budget_step_limit(plan, training.history(), position.step))
    session.tracker = WandbRun() if not prepared.ranks.is_main else WandbRun.start(
        mode=config.output.wandb, project=config.output.wandb_project, group=config.output.wandb_group,
        run_dir=run_dir.path, run_id=run_dir.run_id if not resume else f"{run_dir.run_id}-resumed-{summary.resumed}",
        config=run_dir.read_config(),
        tags=[config.data.dataset, f"norm:{config.model.norm}", f"engine:{config.privacy.engine}",
              f"noise:{plan.noise_multiplier}", f"robust:{robust.robust}"] + (["resumed"] if resume else []))
    summary.wandb = session.tracker.directory or session.tracker.error
    summary.budget_steps = session.step_limit if plan.max_epsilon is not None else None
    if prepared.ranks.is_main:
        announce(config, plan, run_dir, position, session.step_limit)
        if prepared.released_statistics is not None:
            print(release_line(config, plan.n_train, prepared.released_statistics), flush=True)

    session.progress = TrainingProgress(RunShape(
        epochs=config.train.epochs, device=device.type,
        examples_per_epoch=plan.expected_batch_size * plan.steps_per_epoch / prepared.ranks.world_size),
        enabled=prepared.ranks.is_main)
    try:
        with recording_outcome(summary), StopSignals() as session.stop, session.progress.heartbeat():
            _train_epochs(session, start, started)
            if robust.masking_checks or transfer_source is not None:
                summary.masking_checks = run_masking_checks(training.model, data.test, config, device,
                                                            seeds.evaluation, summary.robust_acc, transfer_source)
                run_dir.write_summary(summary)
    finally:
        if plan.private:
            _account(summary, config, plan, training.history())
        summary.wall_seconds = start.previous_seconds + time.time() - started
        try:
            run_dir.write_summary(summary)
        except OSError as error:
            log.error("%s", error)
        session.tracker.finish(summary, exit_code=exit_code_for(summary))
    if prepared.ranks.is_main:
        report_outcome(summary, config, plan, run_dir)
    return summary


def _account(summary: TrainingSummary, config: Config, plan: PrivacyPlan, history: list) -> None:
    """The summary's two epsilons (``src.summary``): of the released outputs (the last finished epoch's steps,
    under every accountant) and of the budget spent (every step taken, which a resume continues from)."""
    # The accountant's history starts with what was released before training (plan.prelude), then DP-SGD's steps.
    released = history_until(history, plan.prelude_steps + summary.steps)
    summary.epsilon_by_accountant = epsilon_by_accountant(released, plan.delta) if summary.epochs else None
    summary.epsilon_gdp_approximation = gdp_approximation(released, plan.delta) if summary.epochs else None
    summary.steps_spent = steps_in(history) - plan.prelude_steps
    summary.epsilon_spent = bounded_epsilon(config.privacy.accountant, history, plan.delta)


def _train_epochs(session: RunSession, start: Start, started: float) -> None:
    """The epoch loop from ``start.position``: train, evaluate, record and checkpoint each epoch; stop at the
    privacy budget."""
    position, sampling_state, previous_seconds = start.position, start.sampling_state, start.previous_seconds
    config, plan, training, run_dir, summary = (session.config, session.plan, session.training,
                                                 session.run_dir, session.summary)
    robust, every = config.robust, config.train.checkpoint_every
    step = position.step
    for epoch in range(position.epoch + 1, config.train.epochs + 1):
        epoch_started = time.time()
        resumed = position.partial if epoch == position.epoch + 1 else None
        first_step = step - (resumed.steps if resumed else 0)

        def after_step(progress: EpochProgress, epoch=epoch, first_step=first_step) -> None:
            if every and (first_step + progress.steps) % every == 0 and progress.steps < plan.steps_per_epoch:
                session.save_checkpoint(Position(epoch=epoch - 1, step=first_step + progress.steps,
                                                 partial=progress))

        try:
            progress = train_epoch(session, EpochSpec(epoch=epoch, first_step=first_step,
                                                      step_limit=session.step_limit, resumed=resumed,
                                                      sampling_state=sampling_state if resumed else None),
                                   after_step=after_step)
        except StoppedAtBoundary as stop:  # checkpoint the last finished step, then stop as interrupted
            session.save_checkpoint(Position(epoch=epoch - 1, step=first_step + stop.boundary.progress.steps,
                                             partial=stop.boundary.progress), streams=stop.boundary.streams)
            raise
        step = first_step + progress.steps
        require_finite_weights(training.base_model)  # before evaluating and saving this epoch
        epsilon = (epsilon_from_history(config.privacy.accountant, training.history(), plan.delta)
                   if plan.private else math.inf)
        train_seconds = time.time() - epoch_started
        budget_hit = session.step_limit is not None and step >= session.step_limit and step < plan.steps
        with_robust = bool(robust.eval_robust_size) and (epoch % robust.eval_robust_every == 0
                                                         or epoch == config.train.epochs or budget_hit)
        trained = checkpoint.rank_streams(session.generators) if session.stop is not None else None
        try:  # a stop signal abandons the evaluation: the resume redoes it from this epoch's trained state
            with (session.stop.abortable() if session.stop is not None else contextlib.nullcontext(),
                  session.progress.evaluating(epoch) if session.progress else contextlib.nullcontext()):
                row = {"epoch": epoch, "step": step,
                       **_evaluate(session, training.model, session.refresh_public, with_robust)}
                if session.ema is not None:  # the average of the weights, evaluated the same way (post-processing)
                    evaluated = _evaluate(session, session.ema, session.refresh_ema, with_robust)
                    row.update({f"{key}_ema": value for key, value in evaluated.items()})
        except StopNow:
            session.save_checkpoint(Position(epoch=epoch - 1, step=step, partial=progress), streams=trained)
            raise Interrupted(session.stop.reason(f"after step {step}, before epoch {epoch}'s evaluation")) from None
        row.update(epsilon=epsilon, seconds=time.time() - epoch_started, train_seconds=train_seconds)
        if config.output.unprotected_train_stats:
            row.update(train_loss_unprotected=progress.loss, train_acc_unprotected=progress.accuracy)
        measured = {k: v for k, v in row.items() if k.startswith("robust_acc") and v is not None}
        per_epoch_only = ("epoch", "step", "seconds", "train_seconds", "robust_acc", "robust_acc_ema")
        summary.update(**{k: v for k, v in row.items() if k not in per_epoch_only}, **measured,
                       epochs=epoch, steps=step, wall_seconds=previous_seconds + time.time() - started)
        test_loss = row["test_loss"]
        summary.update(n_test=len(session.data.test), test_acc_ci95=accuracy_interval(row["test_acc"],
                                                                                      len(session.data.test)))
        # Checkpoint first, then release: a kill between the two resumes after this epoch instead of
        # redoing it with fresh noise (secure RNG, GPU), which would release two versions of one epoch.
        run_dir.metrics.append(json_safe(row))
        session.save_checkpoint(Position(epoch=epoch, step=step))
        run_dir.rewrite_metrics()
        run_dir.save_model(training.base_model.state_dict())
        if session.ema is not None:
            run_dir.save_model(session.ema.module.state_dict(), averaged=True)
        session.tracker.log(row, step=step)
        run_dir.write_summary(summary)
        if session.ranks.is_main:
            tqdm.write(epoch_line(config, plan, row), file=sys.stdout)
        if not math.isfinite(test_loss):
            raise TrainingStopped("diverged", f"test loss became {test_loss} after epoch {epoch}; lower --lr")
        if budget_hit:
            raise TrainingStopped("budget-exhausted", (
                f"--max-epsilon {plan.max_epsilon:g} reached: stopped after step {step} of {plan.steps} at epsilon "
                f"{epsilon:.4g} ({plan.accountant}); step {step + 1} would spend "
                f"{epsilon_after_next_step(plan, training.history()):.4g}"))
        if epoch < config.train.epochs and session.stop is not None and session.stop.requested():
            raise Interrupted(session.stop.reason(f"after epoch {epoch} (step {step})"))  # its checkpoint is above


def _evaluate(session: RunSession, model: torch.nn.Module, refresh_public: Optional[Callable[[], None]],
              with_robust: bool) -> dict:
    """Test (and validation) loss and accuracy of ``model``, and its robust accuracy when due; bn-public
    models first get the public statistics of their final weights."""
    config, data, device = session.config, session.data, session.device
    clean = session.inputs or TrainingInputs(data.train, data.val, data.test)  # the features, or the sets
    if refresh_public is not None:
        refresh_public()
    test_loss, test_acc = evaluate(model, clean.test, batch_size=config.train.eval_batch_size, device=device)
    result = {"test_loss": test_loss, "test_acc": test_acc, "robust_acc": None}
    if clean.val is not None:
        result["val_loss"], result["val_acc"] = evaluate(model, clean.val, batch_size=config.train.eval_batch_size,
                                                         device=device)
    if with_robust:
        robust = config.robust
        result["robust_acc"] = robust_accuracy(model, data.test, robust.eval_attack_spec(),
                                               size=robust.eval_robust_size,
                                               batch_size=config.train.eval_batch_size, device=device,
                                               seed=session.seeds.evaluation)
    return result


def load_run_model(run_path: str, spec: DatasetSpec, device: torch.device,
                   compile_scattering: bool = False) -> torch.nn.Module:
    """The saved model of a finished run directory (its config.json says how to build it; ``compile_scattering``
    turns the compiled scattering on where the run had it off: it changes the speed, not the model)."""
    run_dir = RunDirectory(Path(run_path))
    try:
        record = run_dir.read_config()
        state = run_dir.load_model_state(map_location=device)
    except FileNotFoundError as missing:
        raise UserError(f"{run_path} is not a finished run directory: "
                        f"{Path(missing.filename).name} is missing") from None
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot read the run in {run_path}: {type(error).__name__}: {error}") from None
    dataset = record.get("data", {}).get("dataset")
    if dataset != spec.name:
        raise UserError(f"the run in {run_path} trained on {dataset!r}, not --dataset {spec.name}")
    model_config = ModelConfig(**record["model"])
    if compile_scattering:
        model_config = dataclasses.replace(model_config, compile_scattering=True)
    model = spec.build_model(model_config).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"model.pt in {run_path} does not fit its config.json: {str(error).splitlines()[0]}") from None
    return model.eval()


def run_masking_checks(model, test_set, config: Config, device: torch.device, seed: int,
                       robust_acc: Optional[float], transfer_source=None) -> dict:
    """The gradient-masking report (``attacks.robust_eval.masking_checks``), always on the evaluation PGD, whose
    steps, restarts and radius it varies; with ``--eval-attack autoattack`` (or ``apgd``) that accuracy is recorded
    beside it (a PGD accuracy far above AutoAttack's is itself a sign of masking)."""
    robust = config.robust
    with_autoattack = robust.eval_attack in ENSEMBLES
    report = masking_checks(model, test_set, robust.eval_pgd_spec(), size=robust.eval_robust_size,
                            batch_size=config.train.eval_batch_size, device=device, seed=seed,
                            source=transfer_source, baseline=None if with_autoattack else robust_acc)
    if with_autoattack:
        report[f"{robust.eval_attack}_robust_acc"] = robust_acc
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


def exit_code_for(summary: RunSummary) -> int:
    """0 for a finished run or one stopped by its privacy budget (as asked), 130 for an interrupted one,
    1 for one that diverged or failed."""
    return {"finished": 0, "budget-exhausted": 0, "interrupted": 130}.get(summary.status, 1)
