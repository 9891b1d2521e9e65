"""``--resume RUN_DIR``: the configuration a run continues with is the one it started with.

Only settings declared resumable (where things are: data root, device; how they are tracked: wandb) may
be given again: the resume parser (``src.cli``) has no other flag, so a resumed run is the same experiment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from src.config import SETTINGS, Config, validate
from src.errors import UserError
from src.run_directory import RunDirectory

NOT_RESUMABLE = ("finished", "budget-exhausted")


def resume_config(run_path: str, flags: Mapping[str, Any]):
    """(Config, dataset spec) of the run in ``run_path``, with the allowed overrides from ``flags``."""
    from src.datasets import get_dataset, validate_for_dataset

    path = Path(run_path)
    run_dir = RunDirectory(path)
    try:
        record = run_dir.read_config()
        status = run_dir.read_summary().status
    except FileNotFoundError as missing:
        raise UserError(f"{run_path} is not a run directory: {Path(missing.filename).name} is missing") from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the run in {run_path}: {type(error).__name__}: {error}") from None
    if status in NOT_RESUMABLE:
        raise UserError(f"the run in {run_path} is {status}: there is nothing to resume")
    dataset = record.get("data", {}).get("dataset")
    if flags.get("dataset") not in (None, dataset):
        raise UserError(f"the run in {run_path} trains on {dataset}, not --dataset {flags['dataset']}")
    try:
        for setting in SETTINGS.values():
            if setting.flag.resumable and flags.get(setting.name) is not None:
                record[setting.section][setting.name] = flags[setting.name]
        record["output"].update(out=str(path.parent), run_id=path.name)
        config = Config.from_dict(record)
    except (KeyError, TypeError, AttributeError) as error:
        raise UserError(f"config.json in {run_path} does not describe a run of this version ({error})") from None
    validate(config)
    spec = get_dataset(dataset)
    validate_for_dataset(config, spec)
    return config, spec
