"""What a run prints on the console: the run line, notes, one line per epoch and the outcome. Everything
printed is covered by the reported epsilon (training-set statistics only with --unprotected-train-stats,
labelled)."""
from __future__ import annotations

from typing import Optional

from src.checkpoint import Position
from src.config import Config
from src.accounting import PrivacyPlan
from src.run_directory import RunDirectory
from src.summary import TrainingSummary


SEED_NOTE = ("note: --seed makes the noise and the batches replayable; the privacy guarantee assumes the seed "
             "stays as secret as the data (leave --seed out to draw them from the OS)")


def describe(config: Config, plan: PrivacyPlan, run_dir: RunDirectory) -> str:
    privacy = "non-private (no clipping, no noise)"
    if plan.private:
        how = f"calibrated for epsilon {config.privacy.target_epsilon:g}" if plan.noise_calibrated else "given"
        privacy = (f"noise {plan.noise_multiplier:.4g} ({how}), clip {config.privacy.clip:g}, "
                   f"{config.privacy.accountant} accountant, delta {plan.delta:g}: "
                   f"epsilon {plan.epsilon:.4g} after all {plan.steps} steps"
                   + (f", including bn-dp's statistics (noise {config.model.norm_noise:g}, clip "
                      f"{config.model.norm_clip:g}: epsilon {plan.prelude_epsilon:.3g} alone)" if plan.prelude else ""))
    return (f"run {run_dir.path}: {config.data.dataset}, norm {config.model.norm}, act {config.model.act}, "
            f"engine {config.privacy.engine}; n={plan.n_train}, batch {plan.batch_size} (q={plan.sample_rate:.5f}), "
            f"{plan.epochs} epoch(s) x {plan.steps_per_epoch} steps; {privacy}")


def announce(config: Config, plan: PrivacyPlan, run_dir: RunDirectory, position: Position,
              step_limit: Optional[int]) -> None:
    print(describe(config, plan, run_dir), flush=True)
    if plan.private and config.train.seed is not None and not config.privacy.secure_rng:
        print(SEED_NOTE, flush=True)
    if config.output.unprotected_train_stats:
        print("note: --unprotected-train-stats releases loss and accuracy on the private batches "
              "(train_*_unprotected): they are NOT covered by epsilon", flush=True)
    if position.step:
        print(f"resuming after step {position.step} (epoch {position.epoch + 1}"
              f"{', mid-epoch' if position.partial else ''}) from {run_dir.checkpoint_path}",
              flush=True)
    if step_limit is not None and step_limit < plan.steps:
        print(f"budget: --max-epsilon {plan.max_epsilon:g} allows {step_limit} of the {plan.steps} steps; "
              "the run will stop there", flush=True)
    robust = config.robust
    if robust.robust:
        print(f"robust training: {robust.train_attack().describe()} on {100 * robust.adv_ratio:g}% of each batch; "
              f"robust accuracy: {robust.eval_attack_spec().describe()} on {robust.eval_robust_size} test images",
              flush=True)


def epoch_line(config: Config, plan: PrivacyPlan, row: dict) -> str:
    eps_text = f"eps {row['epsilon']:.3f} ({config.privacy.accountant})" if plan.private else "non-private"
    parts = [f"epoch {row['epoch']}/{config.train.epochs}"]
    if "train_loss_unprotected" in row:
        parts.append(f"UNPROTECTED train loss {row['train_loss_unprotected']:.4f} "
                     f"acc {row['train_acc_unprotected']:.2f}%")
    if "val_acc" in row:
        parts.append(f"val {row['val_acc']:.2f}%")
    parts.append(f"test {row['test_acc']:.2f}%")
    if "test_acc_ema" in row:  # --ema: the averaged weights
        parts.append(("ema " + (f"val {row['val_acc_ema']:.2f}% " if "val_acc_ema" in row else "")
                      + f"test {row['test_acc_ema']:.2f}%"))
    if row["robust_acc"] is not None:
        parts.append(f"robust {row['robust_acc']:.2f}%")
    return "  ".join(parts + [eps_text, f"{row['seconds']:.1f}s"])


def accuracy_interval(accuracy: float, n: int) -> list:
    """The 95% interval of an accuracy (in %) measured on n images: Wilson's score interval for a binomial
    proportion (scipy's ``binomtest``), e.g. about +-2.8 points around 70% on 1000 images."""
    from scipy.stats import binomtest

    correct = round(accuracy * n / 100)
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(100 * interval.low), float(100 * interval.high)]  # plain floats: checkpoints load weights-only


def report_outcome(summary: TrainingSummary, config: Config, plan: PrivacyPlan, run_dir: RunDirectory) -> None:
    if summary.status == "interrupted":
        print(stopped_on_request(summary, run_dir), flush=True)
        return
    if summary.status not in ("finished", "budget-exhausted"):
        return
    by_acc = dict(summary.epsilon_by_accountant or {})
    extra = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in by_acc.items())
    if summary.epsilon_gdp_approximation is not None:
        extra += f"; gdp approximation {summary.epsilon_gdp_approximation:.3f}, not a guarantee"
    robust_text = (f", robust accuracy {summary.robust_acc:.2f}% ({config.robust.eval_attack_spec().describe()})"
                   if summary.robust_acc is not None else "")
    interval = (f" (95% interval {summary.test_acc_ci95[0]:.1f}-{summary.test_acc_ci95[1]:.1f}, "
                f"{summary.n_test} test images)" if summary.test_acc_ci95 else "")
    averaged = (f"; averaged weights (--ema): test accuracy {summary.test_acc_ema:.2f}%"
                if summary.test_acc_ema is not None else "")
    print(f"{summary.status}: test accuracy {summary.test_acc:.2f}%{interval}{robust_text}"
          + (f", epsilon {summary.epsilon:.3f} at delta {plan.delta:g} ({extra})" if plan.private else "")
          + f"{averaged}; {run_dir.path}", flush=True)


def stopped_on_request(summary: TrainingSummary, run_dir: RunDirectory) -> str:
    """A deliberate stop (Ctrl-C, SIGTERM) is not an error: say what happened, what is kept and the command that
    continues it. ``summary.reason`` is ``src.preemption.StopSignals.reason``'s text."""
    reason = (summary.reason or "").replace("; continue with --resume", "")
    released = "no epoch had finished"
    if summary.epochs:
        spent = (f" at epsilon {summary.epsilon:.3f}" if summary.epsilon is not None and summary.epsilon != float("inf")
                 else "")
        released = f"the model of epoch {summary.epochs}{spent} is saved"
    return (f"stopped on request ({reason}); checkpointed, {released}; "
            f"continue with: python vision.py --resume {run_dir.path}")
