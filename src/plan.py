"""``--dry-run``: what a configuration will spend, from the known dataset sizes, without loading data."""
from __future__ import annotations

from src.config import Config
from src.data import DatasetSpec
from src.privacy import GDP_NOTE, plan_privacy
from src.tracking import json_safe


def dry_run_report(config: Config, spec: DatasetSpec) -> dict:
    plan = plan_privacy(config, n_train=spec.planned_train_size(config.data))
    report = {
        "dataset": config.data.dataset,
        "n_train": plan.n_train,
        "batch_size": plan.batch_size,
        "sample_rate": plan.sample_rate,
        "epochs": plan.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "steps": plan.steps,
        "noise_multiplier": plan.noise_multiplier,
        "noise_calibrated": plan.noise_calibrated,
        "target_epsilon": config.privacy.target_epsilon,
        "clip": config.privacy.clip,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "epsilon": plan.epsilon,
        "epsilon_by_accountant": plan.epsilon_by_accountant,
        "engine": config.privacy.engine,
        "private": plan.private,
        "config": config.to_dict(),
    }
    if plan.private and plan.accountant == "gdp":
        report["note"] = GDP_NOTE
    return json_safe(report)
