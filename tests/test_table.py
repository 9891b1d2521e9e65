"""experiments.table and the study parts of collect and figures: intervals over seeds, the best epoch picked by
validation (never by test) accuracy, AutoAttack numbers joined to the runs they evaluated."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from scipy import stats

from experiments.collect import add_evaluations, public_size, training_name
from experiments.figures import accuracy_vs_epsilon, accuracy_vs_public_size
from experiments.table import (Interval, accuracy_band, best_epoch_rows, cell_table, t_interval, to_markdown,
                               with_published)
from src.errors import UserError


def test_interval_is_the_student_t_interval_of_the_mean():
    values = [90.0, 92.0, 97.0]
    interval = Interval.of(values)
    low, high = stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=stats.sem(values))
    assert interval.bounds() == pytest.approx((low, high))
    assert interval.n == 3 and interval.text() == f"93.00 ± {(high - low) / 2:.2f}"
    assert math.isnan(Interval.of([95.0]).half_width) and Interval.of([95.0]).text() == "95.00"
    assert Interval.of([None, float("nan")]).n == 0


def test_the_figures_band_stays_between_0_and_100_percent_and_is_the_t_interval_inside():
    spread = [0.0, 5.0, 30.0]  # robust accuracy of three clean-trained seeds: the t-interval reaches below 0
    assert t_interval(spread)[0] < 0
    assert accuracy_band(spread) == (0.0, pytest.approx(t_interval(spread)[1]))
    assert accuracy_band([99.0, 99.9, 100.0])[1] == 100.0
    assert accuracy_band([90.0, 91.0, 92.0]) == pytest.approx(t_interval([90.0, 91.0, 92.0]))


def _runs(epochs=3, seeds=(0, 1, 2)):
    """A collected table: two cells, three seeds, val accuracy peaking at epoch 2 while test peaks at epoch 3."""
    rows = []
    for norm, shift in (("group", 0.0), ("bn-public", 1.0)):
        for seed in seeds:
            for epoch in range(1, epochs + 1):
                rows.append({"run_id": f"{norm}-{seed}", "norm": norm, "noise_multiplier": 5.0,
                             "training": "clean", "seed": seed, "lr": 0.125, "epoch": epoch,
                             "epsilon": 0.1 * epoch, "val_acc": 80 + shift + (10 if epoch == 2 else 0),
                             "test_acc": 70 + shift + seed + 5 * epoch, "robust_acc": 10.0 + seed + epoch,
                             "autoattack_acc": 8.0 + seed if epoch == epochs else None, "public_size": None})
    return pd.DataFrame(rows)


def test_the_table_gives_minutes_per_run_and_the_white_box_pair_by_name():
    """The CPU results' table: each cell's mean wall time in minutes (only when every run has one), and
    --eval-attack apgd's accuracies in a column of their own, never under AutoAttack's name."""
    table = _runs().drop(columns=["autoattack_acc"])
    table["wall_seconds"] = [600.0 + 60 * seed for seed in table["seed"]]
    table["apgd_acc"] = [a - 1 if a is not None else None for a in _runs()["autoattack_acc"]]
    cells = cell_table(table, ["norm"]).set_index("norm")
    assert cells.loc["group", "minutes per run"] == pytest.approx(11.0)
    assert cells.loc["group", "robust acc (APGD-CE + APGD-T), final"].mean == pytest.approx(8.0)
    assert "robust acc (AutoAttack), final" not in cells
    assert "| 11.0 |" in to_markdown(cells.reset_index())
    table.loc[table["run_id"] == "group-0", "wall_seconds"] = None  # a run recorded before wall times
    assert "minutes per run" not in cell_table(table[table["norm"] == "group"], ["norm"])


def test_published_numbers_stand_beside_the_cell_they_match(tmp_path):
    """README's CPU table: the published number of each (norm, noise) cell, numbers matched as numbers (the
    collected 5.0 against a file's 5), "-" where nothing was published; a file without the column is refused."""
    cells = cell_table(_runs(), ["norm", "noise_multiplier"])
    published = pd.DataFrame({"norm": ["group", "bn-public"], "noise_multiplier": [5, 1],
                              "published": ["69.3 (Tramer & Boneh)", "50.0 (other noise)"]})
    joined = with_published(cells, published, ["norm", "noise_multiplier"]).set_index("norm")
    assert list(joined.columns[:2]) == ["noise_multiplier", "published"]
    assert joined.loc["group", "published"] == "69.3 (Tramer & Boneh)" and joined.loc["bn-public", "published"] == "-"
    assert "| group | 5 | 69.3 (Tramer & Boneh) | 3 |" in to_markdown(joined.reset_index())
    with pytest.raises(UserError, match="'published' column"):
        with_published(cells, published.drop(columns=["published"]), ["norm"])
    with pytest.raises(UserError, match="at least one of"):
        with_published(cells, published[["published"]], ["norm"])


def test_several_sweeps_make_one_table_without_mixing_runs_of_the_same_id(tmp_path, capsys):
    """README's CPU table reads the MNIST and CIFAR-10 sweeps together; both have a run ``group-0`` (ids are only
    unique within a sweep), and each cell must keep its own sweep's epochs."""
    from experiments.table import main

    mnist, cifar = _runs().assign(dataset="mnist", status="finished"), _runs().assign(dataset="cifar10",
                                                                                        status="finished")
    cifar["test_acc"] -= 30  # with ids mixed, each id's last epoch would come from one sweep only
    mnist.to_csv(tmp_path / "mnist.csv", index=False)
    cifar.to_csv(tmp_path / "cifar.csv", index=False)
    out = tmp_path / "both"
    assert main([str(tmp_path / "mnist.csv"), str(tmp_path / "cifar.csv"), "--by", "dataset", "norm",
                 "--out", str(out)]) == 0
    cells = pd.read_csv(f"{out}.csv").set_index(["dataset", "norm"])
    expected = {(name, norm): Interval.of([70 + shift + seed + 15 - offset for seed in (0, 1, 2)]).mean
                for name, offset in (("mnist", 0), ("cifar10", 30)) for norm, shift in (("group", 0), ("bn-public", 1))}
    for key, mean in expected.items():
        assert cells.loc[key, "test acc, final mean"] == pytest.approx(mean), key
    assert main([str(tmp_path / "missing.csv")]) == 2 and "does not exist" in capsys.readouterr().err


def test_cell_table_reports_final_and_validation_picked_best_epoch():
    table = _runs()
    best = best_epoch_rows(table)
    assert set(best["epoch"]) == {2}, "the best epoch is chosen by validation accuracy"
    cells = cell_table(table, ["norm", "noise_multiplier", "training"])
    group = cells[cells["norm"] == "group"].iloc[0]
    assert group["seeds"] == 3 and group["epsilon"] == pytest.approx(0.3)
    assert group["test acc, final"].mean == pytest.approx(70 + 1 + 15)  # seeds 0, 1, 2: mean offset 1
    assert group["test acc, best epoch"].mean == pytest.approx(70 + 1 + 10)
    assert group["robust acc (PGD), final"].mean == pytest.approx(10 + 1 + 3)
    assert group["robust acc (PGD), best epoch"].mean == pytest.approx(10 + 1 + 2)
    assert group["robust acc (AutoAttack), final"].mean == pytest.approx(9.0)
    markdown = to_markdown(cells)
    assert markdown.count("\n") == 2 + 2 and "86.00 ± " in markdown
    # group's robust accuracy measured after the last epoch only (one seed also at epoch 2, its best epoch):
    # its best-epoch mean would be over one run of three, so it is left empty; bn-public's is complete.
    sparse = table.assign(robust_acc=[r if n != "group" or e == 3 or (s == 0 and e == 2) else None
                                      for r, n, e, s in zip(table["robust_acc"], table["norm"], table["epoch"],
                                                            table["seed"])])
    cells = cell_table(sparse, ["norm", "noise_multiplier", "training"]).set_index("norm")
    assert cells.loc["group", "robust acc (PGD), final"].n == 3
    assert cells.loc["group", "robust acc (PGD), best epoch"].n == 0
    assert cells.loc["bn-public", "robust acc (PGD), best epoch"].n == 3
    with pytest.raises(UserError, match="no column"):
        cell_table(table, ["norm", "public_size_x"])
    # A run still going enters nothing: its last epoch is not the plan's last.
    going = pd.concat([table.assign(status="finished"),
                       table[table["epoch"] == 1].assign(run_id="group-9", seed=9, status="running")])
    cells = cell_table(going, ["norm", "noise_multiplier", "training"])
    assert cells[cells["norm"] == "group"].iloc[0]["seeds"] == 3


def test_training_names_and_public_size():
    assert training_name({"robust": False, "attack": "pgd"}) == "clean"
    assert training_name({"robust": True, "attack": "fgsm-rs", "pgd_steps": 40}) == "fgsm-rs"
    assert training_name({"robust": True, "attack": "pgd", "pgd_steps": 3}) == "pgd-3"
    assert public_size({"public_data": "KMNIST (first 105 of 105)"}) == 105
    assert public_size({"public_data": None}) is None
    assert public_size({"public_data": "KMNIST (first 105 of 105)", "public_images_used": 64}) == 64


def _eval_run(folder, name, source, acc, status="finished"):
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"eval_only": str(source)}))
    (run / "summary.json").write_text(json.dumps({"run_id": name, "status": status, "source_run": str(source),
                                                  "robust_acc": acc, "eval_attack": {"method": "autoattack"}}))


def test_evaluations_land_on_the_last_epoch_of_the_run_they_evaluated(tmp_path):
    table = _runs().drop(columns=["autoattack_acc"])
    evaluations = tmp_path / "aa"
    _eval_run(evaluations, "group-0", tmp_path / "final" / "group-0", 42.0)
    _eval_run(evaluations, "group-1", tmp_path / "final" / "group-1", 7.0, status="failed")  # not counted
    joined = add_evaluations(table, evaluations)
    hits = joined[joined["autoattack_acc"].notna()]
    assert list(zip(hits["run_id"], hits["epoch"], hits["autoattack_acc"])) == [("group-0", 3, 42.0)]
    _eval_run(evaluations, "stray", tmp_path / "final" / "other-run", 1.0)
    with pytest.raises(UserError, match="not a run of this sweep"):
        add_evaluations(table, evaluations)


def test_study_figures_draw_every_training_kind_and_the_public_size_curve(tmp_path):
    table = pd.concat([_runs(), _runs().assign(training="pgd-3", run_id=lambda t: t["run_id"] + "-pgd")])
    table["delta"], table["accountant"] = 1e-5, "rdp"
    paths = accuracy_vs_epsilon(table, "test_acc", tmp_path, "study")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and paths[0].stat().st_size > 5000
    sizes = _runs(seeds=(0, 1)).query("norm == 'bn-public'")
    sizes = pd.concat([sizes.assign(public_size=n, run_id=lambda t, n=n: t["run_id"] + f"-{n}") for n in (16, 105)])
    drawn = accuracy_vs_public_size(sizes, tmp_path, "sizes")
    assert drawn and drawn[0].stat().st_size > 5000
    assert accuracy_vs_public_size(sizes[sizes["public_size"] == 16], tmp_path, "one") == []


def test_a_study_at_equal_total_epsilon_makes_its_cells_and_panels_by_that_epsilon(tmp_path, monkeypatch):
    """The CIFAR-10 study holds the total epsilon equal: bn-dp pays for its statistics with more DP-SGD noise, so
    the noise multiplier differs per norm inside one cell and must not split it (or name the figure's panels)."""
    import experiments.figures as figures
    from experiments.table import budget_column, default_cell

    table = pd.concat([_runs().assign(target_epsilon=float(eps), run_id=lambda t, e=eps: t["run_id"] + f"-eps{e}")
                       for eps in (1, 8)])
    table["noise_multiplier"] = [4.5 if norm == "group" else 4.7 for norm in table["norm"]]  # bn-dp-like costs
    table["delta"], table["accountant"] = 1e-5, "rdp"
    assert budget_column(table) == "target_epsilon" and default_cell(table) == ["norm", "target_epsilon", "training"]
    cells = cell_table(table, default_cell(table))
    assert len(cells) == 4 and set(cells["target_epsilon"]) == {1, 8}
    titles = []
    monkeypatch.setattr(figures, "_save", lambda figure, out, name: titles.extend(
        ax.get_title() for ax in figure.axes) or [out / f"{name}.png"])
    assert accuracy_vs_epsilon(table, "test_acc", tmp_path, "study")
    assert titles == ["clean training, total epsilon 1", "clean training, total epsilon 8"]
    # a table with some runs not calibrated to an epsilon keeps the noise multiplier
    table.loc[table.index[:3], "target_epsilon"] = None
    assert default_cell(table) == ["norm", "noise_multiplier", "training"]
