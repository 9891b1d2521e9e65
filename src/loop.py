"""The training loop a reader can take in at once: one epoch of Poisson-sampled logical batches through
BatchMemoryManager, each physical batch attacked (robust training), clipped and noised by the engine; the
divergence stop on the weights; evaluation; the public BatchNorm refresher."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from opacus.utils.batch_memory_manager import BatchMemoryManager

from attacks.adversarial import AdversarialBatches
from dp_layers.augmult import views_per_example
from dp_layers import has_public_batchnorm, refresh_public_statistics
from src.checkpoint import EpochProgress, rank_streams, resumed_sampling
from src.augment import AugmentedViews
from src.data import PublicData
from src.errors import TrainingStopped
from src.preemption import Interrupted, StopNow
from src.progress import RunShape, TrainingProgress
from src.privacy import Training

if TYPE_CHECKING:
    from src.train import PreparedRun


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


@dataclass(frozen=True)
class Numerics:
    """How a training step computes: ``--precision`` and ``--channels-last``."""

    precision: str = "fp32"
    channels_last: bool = False

    def autocast(self, device: torch.device):
        """The forward pass's autocast: bf16 (convolutions and matrix products in bf16, reductions and losses
        in float32), or none for fp32. The backward pass follows the forward's dtypes; bk takes each layer's
        norms and clipped sums in the parameters' float32 (``dp_layers.bk``)."""
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def layout(self, images: torch.Tensor) -> torch.Tensor:
        """The batch in the model's memory format (channels-last: NHWC strides, which GPU convolution kernels
        prefer, especially in bf16)."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images


@dataclass
class BatchStats:
    """Summed loss and correct count of one physical batch on the private inputs trained on: released
    only with ``--unprotected-train-stats`` (epsilon does not cover them: one example's loss is unbounded)."""

    loss_sum: float
    correct: int


def _physical_step(training: Training, images: torch.Tensor, labels: torch.Tensor,
                   adversarial: Optional[AdversarialBatches] = None, *, views: Optional[AugmentedViews] = None,
                   with_stats: bool = False, numerics: Numerics = Numerics(),
                   before_clipping: Optional[Callable[[Training], None]] = None,
                   abortable=contextlib.nullcontext) -> Optional[BatchStats]:
    """Forward/backward on one physical batch and ``optimizer.step()`` (a real step only at the end of a
    logical batch). With ``views`` (--augment, --augmult) the model trains on K augmented views of each
    example, and every engine clips the mean of an example's view gradients once (``dp_layers.augmult``).
    With ``adversarial`` (robust training) the rows are then attacked against the current weights. With
    ``with_stats`` it returns the batch's loss and correct count, averaged over views (else None: nothing
    about the private batch is read outside the DP mechanism, not even to decide to stop). ``numerics``:
    bf16 runs the training forward pass (not the attack) under bf16 autocast; channels-last lays batches out
    NHWC (``Numerics``).
    """
    k = 1
    with abortable():  # a stop signal may abandon this part: no optimizer, accountant or weight has changed yet
        if views is not None:
            images, labels = views(images, labels)
            k = views.views
        with views_per_example(k):
            if adversarial is not None:
                images = adversarial(training.model, images, labels)
            training.optimizer.zero_grad()
            images = numerics.layout(images)
            with numerics.autocast(images.device):
                logits = training.model(images)
                loss = training.criterion(logits, labels)
            stats = None
            if with_stats:
                loss_sum = (F.cross_entropy(logits.detach().float(), labels, reduction="sum").item()
                            if len(labels) else 0.0)
                stats = BatchStats(loss_sum / k, (logits.detach().argmax(dim=1) == labels).sum().item() / k)
            loss.backward()
            training.group_views(k)
    with views_per_example(k):
        if before_clipping is not None:
            before_clipping(training)
        training.optimizer.step()
    return stats


def require_finite_weights(model: torch.nn.Module) -> None:
    """Stop as diverged if a step left NaN or infinite weights.

    Checked after every optimizer step and before anything is saved: the weights are the DP output, so
    this stop is post-processing and spends no privacy, unlike a stop on the private batch's loss. One sum
    per tensor and one device sync (any NaN or inf makes the total non-finite): 10 ms for ResNet-18 on one
    CPU thread, where an element-wise isfinite took 100 ms."""
    with torch.no_grad():
        total = torch.stack([p.sum() for p in model.parameters()]).sum()
    if not bool(torch.isfinite(total)):
        raise TrainingStopped("diverged", "a step made the weights non-finite (infinite or NaN gradients); lower "
                                          "--lr or --clip (the last checkpoint is kept)")


class StepHooks:
    """Calls the loop makes around each optimizer step, for instruments that need the engine's own clipping
    and noise path (the white-box privacy audit inserts gradient canaries, ``experiments.audit``). The default
    does nothing."""

    def before_clipping(self, training: Training) -> None:
        """After the backward pass of a logical batch's first physical batch, before ``optimizer.step()``."""

    def after_step(self, training: Training) -> None:
        """After each optimizer step that ended a logical batch (the noised gradient is in ``.grad``)."""


@dataclass
class Boundary:
    """The run at its last finished optimizer step: the epoch's progress and every random stream, taken before
    the next logical batch is drawn, so that a stop in the middle of that batch checkpoints a state the resume
    replays exactly."""

    progress: EpochProgress
    streams: dict


class StoppedAtBoundary(Interrupted):
    """A signal stopped the epoch: ``boundary`` is what to checkpoint."""

    def __init__(self, reason: str, boundary: Boundary):
        super().__init__(reason)
        self.boundary = boundary


@dataclass
class EpochSpec:
    """One epoch's place in a run: its number, the steps taken before it, where the privacy budget stops
    it, and for a resumed epoch its progress so far and the sampling generator's state at that point."""

    epoch: int
    first_step: int = 0
    step_limit: Optional[int] = None
    resumed: Optional[EpochProgress] = None
    sampling_state: Optional[torch.Tensor] = None


def train_epoch(run: PreparedRun, spec: EpochSpec,
                after_step: Optional[Callable[[EpochProgress], None]] = None) -> EpochProgress:
    """One pass of Poisson-sampled logical batches, split into physical batches by BatchMemoryManager.

    bn-public models (``run.refresh_public``) recompute the public BatchNorm statistics before the first
    physical batch of every ``--public-refresh-every``-th logical batch, so each step normalizes with
    statistics of the current weights. A resumed epoch draws only its remaining batches. The epoch ends
    early, before step ``spec.step_limit + 1`` (the privacy budget), and ``after_step`` is called after every
    step (mid-epoch checkpoints). With ``--unprotected-train-stats`` it sums the private batches' loss and
    accuracy. A stop signal (``run.stop``, ``src.preemption``) ends it with ``StoppedAtBoundary`` before the next
    physical batch (in a multi-process run, before the next logical batch: the ranks agree on it then).
    ``run.progress`` (``src.progress``) is told of every physical batch: the bar and log lines count examples.
    """
    config, training, device = run.config, run.training, run.device
    epoch, first_step, step_limit = spec.epoch, spec.first_step, spec.step_limit
    steps_per_epoch, refresh_every = run.plan.steps_per_epoch, config.train.public_refresh_every
    with_stats = config.output.unprotected_train_stats
    training.model.train()
    progress = spec.resumed or EpochProgress()
    starts_logical_batch = True
    shown = run.progress or TrainingProgress(RunShape(epochs=config.train.epochs, examples_per_epoch=1.0),
                                             enabled=False)
    examples_per_step = shown.shape.examples_per_epoch / steps_per_epoch
    shown_in_step = 0.0  # nominal examples shown for the logical batch in progress
    # torch notes that the first layer's full backward hook sees no input gradient (inputs are data):
    # expected under Opacus's hooks, and only noise in the output.
    with warnings.catch_warnings(), shown.epoch_of(epoch, progress.steps * examples_per_step), BatchMemoryManager(
            data_loader=training.train_loader, max_physical_batch_size=config.train.physical_batch_size,
            optimizer=training.optimizer) as physical_batches, resumed_sampling(
            training.train_loader.batch_sampler, steps_per_epoch - progress.steps, spec.sampling_state) as started:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        batches = iter(physical_batches)
        started()
        boundary = _boundary(run, progress)
        for images, labels in batches:
            step = first_step + progress.steps  # steps taken before this batch's
            if starts_logical_batch and step_limit is not None and step >= step_limit:
                break
            if run.stop is not None and (starts_logical_batch or not run.ranks.distributed) and run.stop.requested():
                raise StoppedAtBoundary(run.stop.reason(f"after step {first_step + boundary.progress.steps} "
                                                        f"(epoch {epoch})"), boundary)
            if run.refresh_public is not None and starts_logical_batch and step % refresh_every == 0:
                run.refresh_public()
            try:
                stats = _physical_step(training, images.to(device), labels.to(device), run.adversarial,
                                       views=run.views, with_stats=with_stats, numerics=run.numerics,
                                       before_clipping=run.hooks.before_clipping if starts_logical_batch else None,
                                       abortable=run.stop.abortable if run.stop is not None else contextlib.nullcontext)
            except StopNow:
                raise StoppedAtBoundary(run.stop.reason(f"after step {first_step + boundary.progress.steps} "
                                                        f"(epoch {epoch})"), boundary) from None
            nominal = max(0.0, min(config.train.physical_batch_size, examples_per_step - shown_in_step))
            shown.physical_batch(nominal)  # never len(labels): a Poisson batch's size is private (src.progress)
            shown_in_step += nominal
            if stats is not None:
                progress.loss_sum += stats.loss_sum
                progress.correct += stats.correct
                progress.examples += len(labels)
            starts_logical_batch = training.took_step()
            if starts_logical_batch:
                try:
                    require_finite_weights(training.base_model)
                except TrainingStopped as stop:
                    raise TrainingStopped(stop.status, f"step {step + 1} (epoch {epoch}): {stop.reason}") from None
                progress.steps += 1
                shown.at(progress.steps * examples_per_step)
                shown_in_step = 0.0
                run.hooks.after_step(training)
                if run.ema is not None:
                    run.ema.update_parameters(training.base_model)  # the released weights: post-processing
                if stats is not None:
                    shown.postfix(loss_unprotected=f"{progress.loss:.3f}", acc_unprotected=f"{progress.accuracy:.1f}%")
                if after_step is not None:
                    after_step(progress)
                boundary = _boundary(run, progress)
    return progress


def _boundary(run: PreparedRun, progress: EpochProgress) -> Optional[Boundary]:
    """The state a stop would checkpoint (only when stop signals are watched)."""
    if run.stop is None:
        return None
    return Boundary(progress=dataclasses.replace(progress), streams=rank_streams(run.generators))


def public_refresher(model: torch.nn.Module, public: Optional[PublicData],
                     device: torch.device) -> Optional[Callable[[], None]]:
    """For bn-public models: a call that recomputes the public BatchNorm statistics for the current weights
    of ``model`` (the plain model, not an Opacus wrapper)."""
    if not has_public_batchnorm(model):
        return None
    public_images = public.images.float().div(255).to(device)
    refresh = functools.partial(refresh_public_statistics, model, public_images)
    return _Once(refresh) if getattr(model, "normalizes_fixed_features", False) else refresh


class _Once:
    """A refresh that computes once: the statistics of a fixed feature stage's outputs (a ScatterNet's bn-public)
    never change with the weights, so recomputing them every step (128 public images through the scattering,
    0.7 s on the 2-core CPU for CIFAR-10) would give the same numbers again."""

    def __init__(self, refresh: Callable[[], None]):
        self.refresh, self.done = refresh, False

    def __call__(self) -> None:
        if not self.done:
            self.refresh()
            self.done = True
