"""experiments.compute_plan: a plan's runs are counted from its sweep files, and a plan over budget is refused."""
from __future__ import annotations

from pathlib import Path

import yaml

from experiments.compute_plan import load_plan, main

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_cpu_results_plan_loads_and_fits_its_budget(monkeypatch):
    """Every sweep the plan names exists and parses; its total is within its budget."""
    monkeypatch.chdir(ROOT)
    plan = load_plan("experiments/plans/cpu_results.yaml")
    assert plan.budget_hours == 15
    assert 0 < plan.hours() <= plan.budget_hours
    assert [stage.name for stage in plan.stages][:2] == ["mnist-tune", "cifar10-tune"]


def _write(tmp_path: Path, budget: float) -> Path:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "dataset": "mnist", "grid": {"lr": [1.0, 2.0, 4.0]},
                                     "fixed": {"model": "scatternet-cnn"}}))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"name": "p", "budget_hours": budget, "stages": [
        {"name": "tune", "sweeps": [str(sweep)], "minutes_per_run": {"scatternet-cnn": 20}},
        {"name": "final", "runs": {"scatternet-cnn": 3, "default": 1}, "minutes_per_run": {"scatternet-cnn": 20,
                                                                                            "default": 60}}]}))
    return plan


def test_runs_are_counted_from_the_sweeps_and_a_plan_over_budget_is_refused(tmp_path, capsys):
    plan = load_plan(_write(tmp_path, budget=3))
    assert dict(plan.stages[0].runs()) == {"scatternet-cnn": 3}
    assert plan.hours() == (3 * 20 + 3 * 20 + 60) / 60
    assert main([str(_write(tmp_path, budget=3))]) == 0
    assert "total 3.00 h of a budget of 3 h" in capsys.readouterr().out
    assert main([str(_write(tmp_path, budget=2.5))]) == 2
    assert "over its budget" in capsys.readouterr().err


def test_progress_counts_finished_runs_and_their_hours(tmp_path, capsys):
    """With --out, a stage shows its finished runs and the wall time its runs have taken (from their summaries)."""
    import json

    plan = _write(tmp_path, budget=3)
    for run_id, status, seconds in (("lr-1.0", "finished", 1800.0), ("lr-2.0", "running", 900.0)):
        folder = tmp_path / "runs" / "s" / run_id
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"run_id": run_id, "status": status,
                                                         "wall_seconds": seconds}))
    assert main([str(plan), "--out", str(tmp_path / "runs")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| tune"))
    assert row.endswith("| 1/3 | 0.75 |")


def test_a_study_is_planned_stage_by_stage_with_costs_per_training(tmp_path, capsys):
    """A study's tuning, final and last-evaluation stages, counted from the study file before any run: the
    borrowed and narrowed training appears only in the final stage, on its own seeds, and its cost is its own."""
    from tests.test_study import NARROWED

    study = tmp_path / "study.yaml"
    study.write_text(NARROWED)
    plan = tmp_path / "plan.yaml"
    stages = [{"name": part, "study": str(study), "part": part, "per": "training",
               "minutes_per_run": {"clean": 6, "fgsm-rs": 60}} for part in ("tune", "final", "autoattack")]
    plan.write_text(yaml.safe_dump({"name": "p", "budget_hours": 11, "stages": stages}))
    loaded = load_plan(plan)
    assert [dict(s.runs()) for s in loaded.stages] == [{"clean": 12}, {"clean": 12, "fgsm-rs": 4}, {"fgsm-rs": 4}]
    assert loaded.hours() == (12 * 6 + 12 * 6 + 4 * 60 + 4 * 60) / 60
    assert main([str(plan), "--out", str(tmp_path / "runs")]) == 0
    assert "| final | 12 clean, 4 fgsm-rs | 6, 60 | 5.20 | 0/16 |" in capsys.readouterr().out
    stages[0]["part"] = "seeds"
    plan.write_text(yaml.safe_dump({"name": "p", "budget_hours": 11, "stages": stages}))
    assert main([str(plan)]) == 2 and "part is tune, final or autoattack" in capsys.readouterr().err


def test_the_committed_cifar10_study_plan_fits_its_budget_with_the_clean_arm_complete(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = load_plan("experiments/plans/cpu_cifar10_study.yaml")
    assert plan.budget_hours == 20 and 0 < plan.hours() <= plan.budget_hours
    final = next(s for s in plan.stages if s.name == "final").runs()
    assert final["clean"] == 4 * 3 * 3  # every norm at every epsilon, 3 seeds


def test_the_gpu_estimate_of_the_resnet_study_counts_its_135_runs_and_readme_quotes_its_total(monkeypatch):
    """README's GPU cost of cifar10_study_v2 is the plan's total, and the plan counts the runs the study makes:
    3 norms x 3 noises x (2 tuned trainings x 3 learning rates + 3 trainings x 3 seeds)."""
    monkeypatch.chdir(ROOT)
    plan = load_plan("experiments/plans/gpu_cifar10_study_v2.yaml")
    runs = {stage.name: sum(stage.runs().values()) for stage in plan.stages}
    assert runs == {"tune": 9 * 2 * 3, "final": 9 * 3 * 3, "autoattack": 9 * 3 * 3}
    assert runs["tune"] + runs["final"] == 135
    assert f"about {plan.hours():.0f} GPU-hours" in (ROOT / "README.md").read_text()
