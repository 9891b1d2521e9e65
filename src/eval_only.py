"""``vision.py --eval-only RUN_DIR``: re-evaluate a finished run's saved model (clean and robust accuracy,
optionally the gradient-masking checks) under any attack settings, into a new run directory."""
from __future__ import annotations

import time
from pathlib import Path

from src.config import Config
from src.data import DatasetSpec
from src.errors import UserError
from src.run_directory import RunDirectory
from src.summary import EvaluationSummary
from src.tracking import WandbRun, check_wandb_mode, git_commit, recording_outcome
from src.loop import evaluate
from src.train import derive_seeds, exit_code_for, load_run_model, resolve_device, run_masking_checks
from attacks.robust_eval import robust_accuracy


def check_eval_only(config: Config) -> None:
    """An evaluation that measures robustness needs images to attack (training-only flags are refused by the
    parser, src.cli)."""
    if not config.robust.eval_robust_size:
        raise UserError("--eval-only with --eval-robust-size 0 would measure only clean accuracy; give a size > 0")


def run_eval_only(config: Config, spec: DatasetSpec, source_run: str) -> EvaluationSummary:
    started = time.time()
    check_eval_only(config)
    device = resolve_device(config.train.device)
    check_wandb_mode(config.output.wandb)
    model = load_run_model(source_run, spec, device, compile_scattering=config.model.compile_scattering)
    robust = config.robust
    transfer_source = load_run_model(robust.transfer_from, spec, device) if robust.transfer_from else None
    data = spec.load(config.data, False)  # bn-public statistics are buffers saved in model.pt
    seeds = derive_seeds(config.train.seed)

    source_id = Path(source_run).resolve().name
    run_dir = RunDirectory.create(config.output.out,
                                  config.output.run_id or f"{source_id}-eval-{time.strftime('%Y%m%d-%H%M%S')}")
    record = {"eval_only": str(Path(source_run).resolve()), "dataset": spec.name, "data": config.to_dict()["data"],
              "robust": config.to_dict()["robust"], "eval_attack": robust.eval_attack_spec().to_dict(),
              "seed": config.train.seed, "git_commit": git_commit(), "device": str(device)}
    run_dir.write_config(record)
    tracker = WandbRun.start(mode=config.output.wandb, project=config.output.wandb_project,
                             group=config.output.wandb_group, run_dir=run_dir.path, run_id=run_dir.run_id,
                             config=record, tags=[spec.name, "eval-only"])
    summary = EvaluationSummary(run_id=run_dir.run_id, source_run=record["eval_only"], dataset=spec.name,
                                eval_attack=robust.eval_attack_spec().to_dict(),
                                eval_robust_size=robust.eval_robust_size,
                                wandb=tracker.directory or tracker.error)
    try:
        with recording_outcome(summary):
            test_loss, test_acc = evaluate(model, data.test, batch_size=config.train.eval_batch_size, device=device)
            summary.update(test_loss=test_loss, test_acc=test_acc)
            summary.robust_acc = robust_accuracy(model, data.test, robust.eval_attack_spec(),
                                                    size=robust.eval_robust_size,
                                                    batch_size=config.train.eval_batch_size, device=device,
                                                    seed=seeds.evaluation)
            print(f"{source_id}: test accuracy {test_acc:.2f}%, robust accuracy {summary.robust_acc:.2f}% "
                  f"({robust.eval_attack_spec().describe()}, {min(robust.eval_robust_size, len(data.test))} images)",
                  flush=True)
            if robust.masking_checks or transfer_source is not None:
                summary.masking_checks = run_masking_checks(model, data.test, config, device, seeds.evaluation,
                                                            summary.robust_acc, transfer_source)
    finally:
        summary.wall_seconds = time.time() - started
        run_dir.write_summary(summary)
        tracker.log({k: v for k, v in (("test_acc", summary.test_acc), ("robust_acc", summary.robust_acc))
                     if v is not None}, step=0)
        tracker.finish(summary, exit_code=exit_code_for(summary))
    print(f"wrote {run_dir.path}", flush=True)
    return summary
