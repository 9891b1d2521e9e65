"""experiments.dashboard: a study's figures and per-cell table in its wandb group (images, a wandb.Table, line charts
of accuracy against epsilon), read back from the offline run; a tiny real run's keys all land in a section drawn
against epsilon; the study's last step; wandb failures that leave the files written."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from experiments import dashboard, study
from experiments.dashboard import epoch_means, publish_study
from src.tracking import WANDB_KEYS, wandb_key
from tests.cli_process import run_python_c
from tests.conftest import REPO, run_cli
from tests.wandb_records import offline_runs, offline_wandb, read_offline_run  # noqa: F401 (a fixture)


def _study_table(seeds=(0, 1), epochs=3) -> pd.DataFrame:
    """A collected study: two norms x two trainings at one noise, per epoch; bn-public 2 points better."""
    rows = []
    for norm, shift in (("none", 0.0), ("bn-public", 2.0)):
        for training in ("clean", "pgd-3"):
            for seed in seeds:
                for epoch in range(1, epochs + 1):
                    rows.append({"sweep": "s-final", "run_id": f"{norm}-{training}-{seed}", "status": "finished",
                                 "norm": norm, "noise_multiplier": 1.0, "training": training,
                                 "robust": training != "clean", "attack": None if training == "clean" else "pgd",
                                 "seed": seed, "lr": 0.5,
                                 "accountant": "rdp", "delta": 1e-5, "epoch": epoch, "epsilon": 0.5 * epoch,
                                 "val_acc": 80.0 + shift + epoch, "test_acc": 70.0 + shift + seed + epoch,
                                 "robust_acc": 10.0 + shift + epoch,
                                 "autoattack_acc": 9.0 + shift if epoch == epochs else None, "public_size": None})
    return pd.DataFrame(rows)


def test_epoch_means_are_the_figures_lines_and_leave_a_measure_some_seed_lacks_empty():
    table = _study_table()
    table.loc[(table["run_id"] == "none-clean-1") & (table["epoch"] == 2), "robust_acc"] = None
    table = pd.concat([table, _study_table().assign(run_id=lambda t: t["run_id"] + "-np", norm="non-private",
                                                     epsilon=math.inf)])
    means = epoch_means(table).set_index(["norm", "training", "epoch"])
    assert "non-private" not in means.index.get_level_values("norm"), "no epsilon, no place on the axis"
    assert means.loc[("bn-public", "clean", 3), "test_acc"] == pytest.approx(70 + 2 + 0.5 + 3)  # seeds 0 and 1
    assert means.loc[("bn-public", "clean", 3), "seeds"] == 2 and means.loc[("none", "clean", 1), "epsilon"] == 0.5
    assert math.isnan(means.loc[("none", "clean", 2), "robust_acc"]) and means.loc[("none", "clean", 3), "robust_acc"]
    assert means.loc[("none", "pgd-3", 3), "line"] == "none, noise 1"


@pytest.mark.slow
def test_the_dashboard_logs_figures_table_and_charts_to_the_group(offline_wandb):
    """``python -m experiments.dashboard``, in a process of its own as a researcher runs it (a test process that
    had run wandb for other tests was seen to record a summary run without its group)."""
    csv = offline_wandb / "s-final.csv"
    _study_table().to_csv(csv, index=False)
    argv = [str(csv), "--out", str(offline_wandb / "images"), "--runs", str(offline_wandb / "runs"),
            "--wandb", "offline", "--project", "p"]
    done = run_python_c("import sys; from experiments import dashboard; sys.exit(dashboard.main(sys.argv[1:]))",
                        argv, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "wandb group s-final:" in done.stdout
    figures = sorted(p.name for p in (offline_wandb / "images").glob("*.png"))
    assert figures == ["s-final_accuracy_vs_epsilon.png", "s-final_robust_accuracy_vs_epsilon.png"]
    cells = pd.read_csv(offline_wandb / "s-final-table.csv")
    assert len(cells) == 4 and (offline_wandb / "s-final-table.md").exists()

    (directory,) = offline_runs(offline_wandb / "runs" / "s-final-summary")
    recorded = read_offline_run(directory)
    assert (recorded.group, recorded.job_type, recorded.name) == ("s-final", "study-summary", "s-final-summary")
    logged = recorded.summary
    for name in ("accuracy_vs_epsilon", "robust_accuracy_vs_epsilon"):
        assert logged[f"figures/{name}"]["_type"] == "image-file"
    assert logged["tables/cells"]["_type"] == "table-file" and logged["tables/cells"]["nrows"] == 4
    media = [str(p) for p in recorded.media()]
    assert sum(p.startswith("images/figures/") and p.endswith(".png") for p in media) == 2
    (cells_file,) = (directory / "files" / "media" / "table" / "tables").glob("cells_*.table.json")
    logged_cells = json.loads(cells_file.read_text())
    assert logged_cells["columns"] == list(cells.columns) and len(logged_cells["data"]) == 4
    assert "NaN" not in cells_file.read_text(), "an empty cell is null in JSON"
    # wandb's own line charts: accuracy against epsilon, one line per normalization, one chart per training
    charts = recorded.charts()
    assert set(charts) == {f"charts/{m}_vs_epsilon_{t}" for m in ("test_acc", "robust_acc") for t in ("clean", "pgd-3")}
    assert charts["charts/test_acc_vs_epsilon_clean"]["panelDefId"] == "wandb/line/v0"
    assert charts["charts/test_acc_vs_epsilon_clean"]["fieldSettings"] == {"x": "epsilon", "y": "test_acc",
                                                                          "stroke": "line"}
    assert {f"{key}_table" for key in charts} <= set(logged), "each chart's data is logged with it"
    (chart_file,) = (directory / "files" / "media" / "table" / "charts").glob("test_acc_vs_epsilon_clean_*.json")
    chart = pd.DataFrame(**{k: v for k, v in json.loads(chart_file.read_text()).items() if k in ("columns", "data")})
    assert set(chart["line"]) == {"none, noise 1", "bn-public, noise 1"} and len(chart) == 6
    assert chart.set_index(["line", "epoch"]).loc[("bn-public, noise 1", 3), "test_acc"] == pytest.approx(75.5)


def test_a_wandb_failure_leaves_the_files_and_the_exit_code(offline_wandb, monkeypatch, capsys):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("wandb service could not start")

    monkeypatch.setattr(wandb, "init", broken_init)
    csv = offline_wandb / "s-final.csv"
    _study_table().to_csv(csv, index=False)
    assert dashboard.main([str(csv), "--out", str(offline_wandb / "images"), "--runs", str(offline_wandb)]) == 0
    assert "not logged: wandb service could not start" in capsys.readouterr().err
    assert len(list((offline_wandb / "images").glob("*.png"))) == 2 and (offline_wandb / "s-final-table.md").exists()
    # The study's last step never raises, even with nothing to collect.
    failed = publish_study("nothing", offline_wandb / "empty", "offline")
    assert failed.wandb.startswith("not logged: UserError") and not failed.logged


def test_the_study_logs_its_dashboard_once_every_stage_is_done(tmp_path, monkeypatch, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("name: s\ndataset: mnist\ncells: {norm: [none]}\ntune: {lr: [0.5]}\nseeds: [0]\n"
                    "fixed: {val-size: 20}\n")
    stage = {"runs": 1, "skipped": 0, "finished": 1, "failed": 0, "resumed": 0, "stopped": 0,
             "directory": str(tmp_path), "stopped_by": ""}
    report = {"tune": stage, "final": stage, "autoattack": stage}
    calls = []
    monkeypatch.setattr(study, "run_study", lambda *a, **k: report)
    monkeypatch.setattr(dashboard, "publish_study", lambda *a: calls.append(a) or dashboard.Dashboard({}, []))
    assert study.main([str(path), "--out", str(tmp_path), "--wandb", "offline"]) == 0
    assert calls == [("s", tmp_path, "offline")] and "dashboard:" in capsys.readouterr().out
    assert study.main([str(path), "--out", str(tmp_path), "--wandb", "disabled"]) == 0 and len(calls) == 1
    report["final"] = {**stage, "failed": 1}  # a failed point: the next call finishes it, then draws
    assert study.main([str(path), "--out", str(tmp_path), "--wandb", "offline"]) == 1 and len(calls) == 1


@pytest.fixture(scope="module")
def tiny_final_stage(tiny_root, tmp_path_factory):
    """One tiny private run in a study's final-stage folder and wandb group, with every kind of released number:
    validation, averaged weights (--ema), robust accuracy."""
    out = tmp_path_factory.mktemp("study")
    result = run_cli("--dataset", "mnist", "--data-root", tiny_root, "--train-subset", 120, "--batch-size", 40,
                     "--physical-batch-size", 40, "--epochs", 2, "--noise", 1, "--lr", 0.5, "--seed", 0,
                     "--val-size", 20, "--ema", 0.9, "--eval-robust-size", 8, "--eval-pgd-steps", 2,
                     "--out", out / "tiny-final", "--run-id", "r0", "--wandb-group", "tiny-final",
                     "--wandb", "offline", cwd=out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_a_runs_released_keys_stay_flat_in_its_files_and_all_have_a_section_in_wandb(tiny_final_stage):
    run_dir = tiny_final_stage / "tiny-final" / "r0"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set(rows[0])
    assert {"test_acc", "val_acc", "test_acc_ema", "robust_acc", "epsilon", "seconds"} <= keys
    unmapped = {k for k in keys if "/" not in wandb_key(k)}
    assert not unmapped, f"add {sorted(unmapped)} to src.tracking.WANDB_KEYS"
    (directory,) = offline_runs(run_dir)
    recorded = read_offline_run(directory)
    assert recorded.history_keys() == {wandb_key(k) for k in keys}
    assert [h["privacy/epsilon"] for h in recorded.history] == pytest.approx([r["epsilon"] for r in rows])
    accuracy_keys = {wandb_key(k) for k in keys if wandb_key(k).split("/")[0] in ("test", "val", "robust")}
    assert len(accuracy_keys) >= 8 and all(recorded.step_metric(k) == WANDB_KEYS["epsilon"] for k in accuracy_keys)
    assert recorded.summary["test_acc"] == json.loads((run_dir / "summary.json").read_text())["test_acc"]


@pytest.mark.slow
def test_the_study_summary_of_real_runs_lands_in_their_group(tiny_final_stage, offline_wandb):
    """In a fresh process, as experiments.study calls it: a test process that already ran wandb (other tests)
    was seen to record the summary run without its group."""
    script = ("import json, sys; from pathlib import Path; from experiments.dashboard import publish_study; "
              "done = publish_study('tiny', Path(sys.argv[1]), 'offline'); "
              "print(json.dumps([bool(done.logged), done.wandb]))")
    result = run_python_c(script, [tiny_final_stage], cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    logged, wandb_dir = json.loads(result.stdout.strip().splitlines()[-1])
    summary_dir = tiny_final_stage / "tiny-final-summary"
    assert logged and wandb_dir.startswith(str(summary_dir / "wandb" / "offline-run-"))
    assert (summary_dir / "tiny-final.csv").exists() and (summary_dir / "tiny-final-table.md").exists()
    assert (summary_dir / "images" / "tiny-final_accuracy_vs_epsilon.png").exists()
    (directory,) = offline_runs(summary_dir)
    recorded = read_offline_run(directory)
    assert (recorded.group, recorded.job_type) == ("tiny-final", "study-summary")
    assert recorded.summary["tables/cells"]["nrows"] == 1
    assert "figures/accuracy_vs_epsilon" in recorded.summary and "charts/test_acc_vs_epsilon_clean" in recorded.charts()
