"""``--resume RUN_DIR``: the configuration a run continues with is the one it started with.

Only settings that say where things are (data root, device) or how they are tracked (wandb) may be
given again; anything that changes what is trained is refused, so a resumed run is the same experiment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from src.config import Config, validate
from src.errors import UserError
from src.run_directory import RunDirectory

RESUMABLE_OVERRIDES = {"data_root": "data", "device": "train", "wandb": "output"}
NOT_RESUMABLE = ("finished", "budget-exhausted")


def resume_config(run_path: str, flags: Mapping[str, Any]):
    """(Config, dataset spec) of the run in ``run_path``, with the allowed overrides from ``flags``."""
    from src.datasets import get_dataset, validate_for_dataset

    path = Path(run_path)
    run_dir = RunDirectory(path)
    try:
        record = run_dir.read_config()
        status = run_dir.read_summary().get("status")
    except FileNotFoundError as missing:
        raise UserError(f"{run_path} is not a run directory: {Path(missing.filename).name} is missing") from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the run in {run_path}: {type(error).__name__}: {error}") from None
    if status in NOT_RESUMABLE:
        raise UserError(f"the run in {run_path} is {status}: there is nothing to resume")
    dataset = record.get("data", {}).get("dataset")
    if flags.get("dataset") not in (None, dataset):
        raise UserError(f"the run in {run_path} trains on {dataset}, not --dataset {flags['dataset']}")
    given = [k for k, v in flags.items() if v is not None and k not in RESUMABLE_OVERRIDES and k != "dataset"]
    if given:
        raise UserError(f"--resume continues the run with its own config.json; drop --{given[0].replace('_', '-')} "
                        f"(only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_OVERRIDES)} may be given)")
    try:
        for key, section in RESUMABLE_OVERRIDES.items():
            if flags.get(key) is not None:
                record[section][key] = flags[key]
        record["output"].update(out=str(path.parent), run_id=path.name)
        config = Config.from_dict(record)
    except (KeyError, TypeError, AttributeError) as error:
        raise UserError(f"config.json in {run_path} does not describe a run of this version ({error})") from None
    validate(config)
    spec = get_dataset(dataset)
    validate_for_dataset(config, spec)
    return config, spec
