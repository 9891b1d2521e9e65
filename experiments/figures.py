"""Draw the paper figures with seaborn into ``images/`` (PNG and PDF).

    python -m experiments.figures experiments/results/mnist-study.csv [--run runs/mnist-study/RUN]
        [--benchmark benchmarks/results_cpu.json] [--out images] [--prefix mnist]

1. test accuracy vs epsilon, one panel per noise multiplier (columns) and training (rows: clean, fgsm-rs,
   pgd-k), hue = normalization, one point per epoch, mean over seeds with a Student-t 95% band: the CS523
   study's Figures 1-2;
2. the same for robust accuracy (runs that measured it);
2b. bn-public's final accuracy against the public-set size, when the table varies it;
3. validation/test accuracy and loss and epsilon per epoch for one run (the plots of the JAX DP-SGD MNIST
   example; statistics of the private training batches are not drawn, since epsilon does not cover them);
4. the engine benchmark: time and memory ratios against non-private training.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from experiments.collect import training_name  # noqa: E402
from experiments.table import accuracy_band, budget_column, final_rows, finished_only  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.run_directory import RunDirectory  # noqa: E402


def _privacy_label(table: pd.DataFrame) -> str:
    accountants = ", ".join(sorted(set(table["accountant"].dropna())))
    deltas = ", ".join(f"{d:g}" for d in sorted(set(table["delta"].dropna())))
    return f"epsilon ({accountants} accountant, delta {deltas})"


def _save(figure, out: Path, name: str) -> list:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in ("png", "pdf"):
        path = out / f"{name}.{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        figure.savefig(tmp, format=suffix, dpi=150, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    plt.close(figure)
    return paths


def _with_training(table: pd.DataFrame) -> pd.DataFrame:
    """The ``training`` column (clean, fgsm-rs, pgd-3, ...); tables collected before it existed derive it."""
    table = table.copy()
    if "training" not in table or table["training"].isna().all():
        table["training"] = [training_name({"robust": bool(robust), "attack": attack if isinstance(attack, str)
                                            else None}) for robust, attack in zip(table["robust"], table["attack"])]
    return table


def accuracy_vs_epsilon(table: pd.DataFrame, column: str, out: Path, name: str) -> list:
    """One point per epoch: mean over seeds and its Student-t 95% interval as a band; panels by privacy budget
    (columns: the noise multiplier, or the total epsilon of a study calibrated to one) and training (rows), one
    colour per normalization."""
    table = finished_only(table)  # a run still going would thin the later epochs' means
    data = _with_training(table[table[column].notna() & table["epsilon"].notna()])
    data = data[data["epsilon"] != float("inf")]
    if data.empty:
        return []
    budget = budget_column(data)
    budgets = [f"{v:g}" for v in sorted(data[budget].unique())]  # panels titled 1, 3, 8 (not 1.0), in order
    data = data.assign(**{budget: data[budget].map(lambda v: f"{v:g}")})
    trainings = sorted(data["training"].unique(), key=lambda t: (t != "clean", t))
    grid = sns.relplot(data=data, x="epsilon", y=column, hue="norm", col=budget, row="training",
                       col_order=budgets, row_order=trainings, kind="line", marker="o", errorbar=accuracy_band,
                       facet_kws={"sharex": "col", "sharey": False}, height=2.8, aspect=1.2)
    ylabel = "test accuracy (%)" if column == "test_acc" else "robust test accuracy (%)"
    grid.set_axis_labels(_privacy_label(data), ylabel)
    grid.set_titles("{row_name} training, " + ("noise multiplier" if budget == "noise_multiplier"
                                                else "total epsilon") + " {col_name}")
    per_cell = data.groupby(["norm", budget, "training"])["seed"].nunique()
    seeds = str(per_cell.min()) if per_cell.min() == per_cell.max() else f"{per_cell.min()}-{per_cell.max()}"
    grid.figure.suptitle(f"{ylabel} vs privacy spent, one point per epoch (mean over {seeds} seed(s) per line, "
                         "band: 95% t-interval, cut to 0-100)", y=1.02)
    return _save(grid.figure, out, name)


def accuracy_vs_public_size(table: pd.DataFrame, out: Path, name: str) -> list:
    """bn-public's final test (and robust) accuracy against the number of public images, over seeds."""
    table = finished_only(table)
    data = final_rows(table[(table["norm"] == "bn-public") & table["public_size"].notna()])
    if data["public_size"].nunique() < 2:
        return []
    measures = [c for c in ("test_acc", "robust_acc") if data[c].notna().any()]
    long = data.melt(id_vars=["public_size", "seed"], value_vars=measures, var_name="measure",
                     value_name="accuracy (%)")
    long["measure"] = long["measure"].map({"test_acc": "test accuracy", "robust_acc": "robust accuracy (PGD)"})
    long["public_size"] = long["public_size"].astype(int)
    grid = sns.catplot(data=long, x="public_size", y="accuracy (%)", col="measure", kind="point",
                       errorbar=accuracy_band, sharey=False, height=3.2, capsize=0.1)
    grid.set_axis_labels("public images for the BatchNorm statistics", "accuracy after the last epoch (%)")
    grid.set_titles("{col_name}")
    noise = ", ".join(f"{v:g}" for v in sorted(data["noise_multiplier"].dropna().unique()))
    grid.figure.suptitle(f"bn-public, noise multiplier {noise}: mean over {data['seed'].nunique()} seeds, "
                         "95% t-interval cut to 0-100", y=1.04)
    return _save(grid.figure, out, name)


def run_curves(run_dir: Path, out: Path, name: str) -> list:
    run = RunDirectory(run_dir)
    rows, summary = run.read_metrics(), run.read_summary()
    if not rows:
        raise UserError(f"{run_dir} has no finished epoch to draw")
    metrics = pd.DataFrame(rows)
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    def present(*columns):  # training-set statistics are not drawn: epsilon does not cover them
        return [c for c in columns if c in metrics and metrics[c].notna().any()]

    accuracy = metrics.melt(id_vars="epoch", value_vars=present("val_acc", "test_acc", "robust_acc"),
                            var_name="split", value_name="accuracy (%)").dropna()
    sns.lineplot(data=accuracy, x="epoch", y="accuracy (%)", hue="split", marker="o", ax=axes[0])
    loss = metrics.melt(id_vars="epoch", value_vars=present("val_loss", "test_loss"), var_name="split",
                        value_name="cross-entropy (nats)")
    sns.lineplot(data=loss, x="epoch", y="cross-entropy (nats)", hue="split", marker="o", ax=axes[1])
    if metrics["epsilon"].notna().any() and (metrics["epsilon"] != float("inf")).all():
        sns.lineplot(data=metrics, x="epoch", y="epsilon", marker="o", ax=axes[2])
        axes[2].set_ylabel(f"epsilon ({summary.accountant}, delta {summary.delta:g})")
    else:
        axes[2].text(0.5, 0.5, "non-private: no epsilon", ha="center", va="center", transform=axes[2].transAxes)
    for ax in axes:
        ax.set_xlabel("epoch")
    figure.suptitle(f"run {run_dir.name}: {summary.dataset}, norm {summary.norm}, "
                    f"engine {summary.engine}")
    figure.tight_layout()
    return _save(figure, out, name)


def engine_benchmark(rows_path: Path, out: Path, name: str) -> list:
    rows = pd.DataFrame(json.loads(Path(rows_path).read_text()))
    rows = rows[rows["engine"] != "non-private"].dropna(subset=["time_ratio"])
    rows["configuration"] = rows["model"] + " " + rows["norm"] + " b" + rows["batch"].astype(str)
    labels = {"time_ratio": "step time / non-private", "working_set_ratio": "working set / non-private",
              "mem_ratio": "peak memory / non-private"}
    measures = [m for m in labels if m in rows and rows[m].notna().any()]  # older rows: no working set
    long = rows.melt(id_vars=["configuration", "engine"], value_vars=measures, var_name="measure", value_name="ratio")
    long["measure"] = long["measure"].map(labels)
    grid = sns.catplot(data=long, x="configuration", y="ratio", hue="engine", col="measure", kind="bar",
                       height=3.6, aspect=1.5, sharey=False)
    grid.set_axis_labels("", "ratio to non-private training (x)")
    grid.set_titles("{col_name}")
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.tick_params(axis="x", rotation=30)
    return _save(grid.figure, out, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, nargs="?", help="a table from experiments.collect")
    parser.add_argument("--run", type=Path, help="a run directory for the per-epoch curves")
    parser.add_argument("--benchmark", type=Path, help="benchmark rows (benchmarks/results_cpu.json)")
    parser.add_argument("--out", type=Path, default=Path("images"))
    parser.add_argument("--prefix", default=None, help="file name prefix (default: the sweep name)")
    args = parser.parse_args(argv)
    sns.set_theme(style="whitegrid", context="paper")
    written = []
    try:
        if args.csv:
            if not args.csv.exists():
                raise UserError(f"{args.csv} does not exist; run python -m experiments.collect first")
            table = pd.read_csv(args.csv)
            prefix = args.prefix or str(table["sweep"].iloc[0])
            written += accuracy_vs_epsilon(table, "test_acc", args.out, f"{prefix}_accuracy_vs_epsilon")
            written += accuracy_vs_epsilon(table, "robust_acc", args.out, f"{prefix}_robust_accuracy_vs_epsilon")
            if "public_size" in table:
                written += accuracy_vs_public_size(table, args.out, f"{prefix}_accuracy_vs_public_size")
        if args.run:
            written += run_curves(args.run, args.out, f"{args.prefix or args.run.name}_run_curves")
        if args.benchmark:
            written += engine_benchmark(args.benchmark, args.out, "engine_benchmark")
    except (UserError, FileNotFoundError) as error:
        print(f"experiments.figures: error: {error}", file=sys.stderr)
        return 2
    if not written:
        print("experiments.figures: error: nothing to draw (give a CSV, --run or --benchmark)", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
