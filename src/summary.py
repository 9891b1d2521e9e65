"""What ``summary.json`` (and wandb's run summary) holds: one typed record, shared by training, ``--eval-only``
and the readers (``experiments.collect``, the figures, the sweep runner).

Everything in it is covered by the reported epsilon: test-set and validation metrics, the privacy plan and
accounting, settings. Loss and accuracy on the private training batches appear only with
``--unprotected-train-stats``, under names that say so. Torch-free: the readers stay light.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

# Keys written only when they hold something (runs without these features keep the summary they had).
WRITTEN_WHEN_SET = ("masking_checks", "train_loss_unprotected", "train_acc_unprotected", "test_loss_ema",
                    "test_acc_ema", "val_loss_ema", "val_acc_ema", "robust_acc_ema")


@dataclass
class RunSummary:
    """What every run directory's summary says: how the run ended and its test-set numbers."""

    run_id: str = ""
    status: str = "running"  # running, finished, budget-exhausted, diverged, interrupted, failed
    reason: Optional[str] = None  # why it stopped, when it did not finish
    dataset: Optional[str] = None
    test_loss: Optional[float] = None
    test_acc: Optional[float] = None
    n_test: Optional[int] = None  # test images evaluated (all the test images present)
    test_acc_ci95: Optional[list] = None  # 95% binomial (Wilson) interval of test_acc on those images
    robust_acc: Optional[float] = None  # last measured: PGD (``eval_attack``) on the first ``eval_robust_size``
    eval_attack: Optional[dict] = None
    eval_robust_size: int = 0
    masking_checks: Optional[dict] = None  # attacks.masking's report, with --masking-checks or --transfer-from
    wandb: Optional[str] = None  # wandb's run folder, or why wandb could not start
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        return {k: v for k, v in record.items() if not (k in WRITTEN_WHEN_SET and v is None)}

    def update(self, **values: Any) -> None:
        for key, value in values.items():
            if not hasattr(self, key):
                raise AttributeError(f"{type(self).__name__} has no field {key!r}")
            setattr(self, key, value)

    @staticmethod
    def from_dict(record: Mapping[str, Any]) -> "RunSummary":
        """The summary a run directory holds: an evaluation's when it names its source run, else a
        training run's. Keys this version does not know (from older versions) are left out."""
        cls = EvaluationSummary if "source_run" in record else TrainingSummary
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(record, Mapping) or "status" not in record:
            raise ValueError("not a run summary (no status)")
        return cls(**{k: v for k, v in record.items() if k in known})


@dataclass
class TrainingSummary(RunSummary):
    """A training run: its privacy plan and accounting, progress, validation metrics and training attack."""

    norm: Optional[str] = None
    engine: Optional[str] = None
    accountant: Optional[str] = None
    delta: Optional[float] = None
    noise_multiplier: Optional[float] = None  # None for non-private runs
    n_train: Optional[int] = None
    sample_rate: Optional[float] = None
    epochs: int = 0  # finished epochs
    steps: int = 0  # optimizer steps taken
    val_loss: Optional[float] = None
    val_acc: Optional[float] = None
    # The epsilon of the released outputs: the model, metrics and summary of the last finished epoch, made by
    # its `steps` (by --accountant; inf for non-private runs, None before an epoch finished). The other
    # accountants' bounds and the GDP approximation are for the same steps, so they agree with it.
    epsilon: Optional[float] = None
    epsilon_by_accountant: Optional[dict] = None  # rdp and prv
    epsilon_gdp_approximation: Optional[float] = None  # labelled: not a guarantee
    # The budget spent: every step taken (by --accountant). Above `epsilon` only when a run stopped
    # mid-epoch (interrupted, diverged): those steps are in the secret checkpoint, which --resume continues.
    steps_spent: Optional[int] = None
    epsilon_spent: Optional[float] = None
    unprotected_train_stats: bool = False
    train_loss_unprotected: Optional[float] = None  # only with --unprotected-train-stats: NOT covered by epsilon
    train_acc_unprotected: Optional[float] = None
    max_epsilon: Optional[float] = None
    budget_steps: Optional[int] = None  # --max-epsilon: the step the guard stops before
    robust: bool = False
    train_attack: Optional[dict] = None
    adv_ratio: Optional[float] = None
    resumed: int = 0  # times continued with --resume
    # --ema: the same evaluation of the average of the weights (post-processing, covered by epsilon)
    test_loss_ema: Optional[float] = None
    test_acc_ema: Optional[float] = None
    val_loss_ema: Optional[float] = None
    val_acc_ema: Optional[float] = None
    robust_acc_ema: Optional[float] = None


@dataclass
class EvaluationSummary(RunSummary):
    """``--eval-only``: a finished run's saved model evaluated again, into a run directory of its own."""

    source_run: str = ""
