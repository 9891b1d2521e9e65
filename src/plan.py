"""``--dry-run``: what a configuration will spend, from the known dataset sizes, without loading data.

The n it plans with is an assumption (the complete data set, less hold-outs, or the subset), not a count
of the files on disk: the report says so, since a partial set on disk gives a run a smaller n, another
sample rate and another epsilon."""
from __future__ import annotations

from src.config import Config
from src.engines import ENGINES
from src.data import DatasetSpec
from src.accounting import GDP_NOTE, bounded_epsilon, plan_privacy
from src.atomic_files import json_safe


def dry_run_report(config: Config, spec: DatasetSpec) -> dict:
    plan = plan_privacy(config, n_train=spec.planned_train_size(config.data))
    report = {
        "dataset": config.data.dataset,
        "n_train": plan.n_train,
        "n_train_assumed": True,
        "n_train_basis": _n_basis(config, spec),
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
        "epsilon_gdp_approximation": plan.epsilon_gdp_approximation,
        "max_epsilon": plan.max_epsilon,
        "budget_steps": plan.budget_steps,  # steps the --max-epsilon guard allows (None: no guard)
        "engine": config.privacy.engine,
        "private": plan.private,
        "config": config.to_dict(),
    }
    if config.model.norm == "bn-dp":
        report["normalization"] = normalization_share(config, plan)
    if plan.private:
        report["note"] = GDP_NOTE
    return json_safe(report)


def normalization_share(config: Config, plan) -> dict:
    """--norm bn-dp's release before training and what it costs: its epsilon alone, and DP-SGD's alone, beside
    the composed epsilon of the run (compositions are not sums: the parts add up to more than the whole)."""
    dp_sgd_alone = (bounded_epsilon(plan.accountant, [(plan.noise_multiplier, plan.sample_rate, plan.steps)],
                                    plan.delta) if plan.private else None)
    return {"norm": "bn-dp", "clip": config.model.norm_clip, "noise_multiplier": config.model.norm_noise,
            "releases": "two noisy sums (per-channel means and means of squares), once, before training",
            "accountant_entries": [list(entry) for entry in plan.prelude],
            "epsilon_alone": plan.prelude_epsilon, "dp_sgd_epsilon_alone": dp_sgd_alone,
            "epsilon_composed": plan.epsilon}


def _n_basis(config: Config, spec: DatasetSpec) -> str:
    d = config.data
    basis = f"assumed, not read from disk: the complete {spec.name} training set ({spec.full_train_size})"
    if d.public_holdout:
        basis += f" less the {d.public_size}-image public hold-out"
    if d.val_size:
        basis += f" less the {d.val_size}-image validation set"
    if d.train_subset is not None:
        basis += f", of which the first {d.train_subset}"
    return basis + "; a run on fewer files on disk plans with what it loads"


def engine_table(config: Config, spec: DatasetSpec) -> str:
    """Markdown table of how ``--engine`` computes each layer's per-sample gradient norm."""
    from dp_layers.explain import BookKeepingOptions, describe_layers

    model = spec.build_model(config.model)
    p = config.privacy
    book_keeping = BookKeepingOptions(batch=config.train.physical_batch_size, views=config.train.views,
                                      keep=p.bk_keep, layer_budget_mb=p.bk_layer_budget)
    rows = describe_layers(model, spec.image_shape, p.engine, book_keeping)
    kept = p.engine == "bk"
    lines = [f"{config.data.dataset} ({type(model).__name__}, norm {config.model.norm}), engine "
             f"{p.engine}: {ENGINES[p.engine].summary}", ""]
    if kept:
        lines += [f"Kept until the clipped sums: for a physical batch of {config.train.physical_batch_size} "
                  f"(x{config.train.views} views), --bk-keep {p.bk_keep}"
                  + (f", --bk-layer-budget {p.bk_layer_budget:g} MB" if p.bk_layer_budget is not None else ""), ""]
    lines += ["| layer | type | input | parameters | per-sample gradient norm |" + (" kept |" if kept else ""),
              "| --- | --- | --- | --- | --- |" + (" --- |" if kept else "")]
    lines += [f"| {r['layer']} | {r['type']} | {r['input']} | {r['parameters']} | {r['method']} |"
              + (f" {r['kept']} |" if kept else "") for r in rows]
    return "\n".join(lines)
