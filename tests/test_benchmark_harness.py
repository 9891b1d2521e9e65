"""The engine benchmark's harness (not its timings): one configuration runs, ratios are against
non-private in the same run, failures are reported instead of hidden."""
from __future__ import annotations

import pytest

from benchmarks import engines


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["non-private", "bk"])
def test_one_configuration_measures_a_real_step(engine):
    """In fresh processes, as the benchmark measures (a test process's heap, already grown by earlier tests, can
    serve a step without any new resident memory)."""
    result = engines.run_in_subprocess(("lenet5", "bn-public", 8), engine, steps=1, warmup=1, image_size=0)
    assert result["step_ms"] > 0 and result["peak_mb"] > 0
    assert 0 < result["working_set_mb"] < result["peak_mb"]  # the steps' own memory, not the interpreter's


def test_rows_are_ratios_against_non_private_of_the_same_run():
    config = ("resnet18", "group", 32)
    samples = {(config, "non-private"): [{"step_ms": 100.0, "peak_mb": 1000.0, "working_set_mb": 200.0},
                                         {"step_ms": 120.0, "peak_mb": 990.0, "working_set_mb": 190.0}],
               (config, "bk"): [{"step_ms": 130.0, "peak_mb": 1100.0, "working_set_mb": 300.0},
                                {"step_ms": 150.0, "peak_mb": 1050.0, "working_set_mb": 250.0}],
               (config, "hooks"): [{"error": "out of memory"}]}
    rows = engines.summarise([config], ["non-private", "bk", "hooks"], samples)
    by_engine = {r["engine"]: r for r in rows}
    assert set(by_engine["bk"]) >= {"model", "norm", "batch", "engine", "step_ms", "peak_mb", "time_ratio", "mem_ratio"}
    assert by_engine["bk"]["step_ms"] == 140.0 and by_engine["bk"]["time_ratio"] == pytest.approx(140 / 110)
    assert by_engine["bk"]["mem_ratio"] == pytest.approx(1100 / 1000)
    assert by_engine["bk"]["working_set_ratio"] == pytest.approx(300 / 200)
    assert by_engine["non-private"]["time_ratio"] == 1.0
    assert by_engine["hooks"]["error"] == "out of memory" and by_engine["hooks"]["time_ratio"] is None
    table = engines.markdown(rows)
    assert "failed: out of memory" in table and "1.27x" in table


def test_the_step_profile_traces_copies_to_the_operators_that_make_them(capsys):
    """The profile runs the training loop's step and attributes every copy to its calling operators: the
    reshape-of-a-view copies that augmult's grouping makes must show up under aten::reshape."""
    from benchmarks import profile_step

    assert profile_step.main(["--model", "lenet5", "--norm", "none", "--batch", "4", "--augmult", "2",
                              "--steps", "1", "--top", "40"]) == 0
    out = capsys.readouterr().out
    assert "lenet5 none batch 4 engine bk" in out and "aten::copy_ by calling operators" in out
    copies = out.split("aten::copy_ by calling operators", 1)[1]
    assert "aten::reshape" in copies


def test_a_plain_benchmark_step_is_plain_whatever_the_dataset_defaults():
    """cifar10's defaults switch the recipe on (augmentation, augmult, WS); the benchmark pins its own, so a
    configuration without --ws/--augmult measures a plain step, and one with them the recipe's."""
    from benchmarks.setup import bench_training
    from dp_layers.weight_standardization import WSConv2d

    plain = bench_training("resnet18", "group", 2, "non-private")
    assert plain.views is None and not any(isinstance(m, WSConv2d) for m in plain.training.model.modules())
    recipe = bench_training("resnet18", "group", 2, "non-private", recipe={"ws": True, "augment": True, "augmult": 2})
    assert recipe.views.views == 2 and any(isinstance(m, WSConv2d) for m in recipe.training.model.modules())


def test_the_working_set_is_the_memory_a_step_holds_at_its_peak():
    """``benchmarks.timing``: a step that holds 200 MB at its peak (and frees it) has a working set of about
    200 MB whatever the interpreter already holds; a step that holds nothing has about none."""
    import torch

    from benchmarks.timing import measure_step

    def holds_200_mb():
        block = torch.ones(50 * 2 ** 20)  # 200 MB of float32, written so that every page is resident
        del block

    cpu = torch.device("cpu")
    busy = measure_step(holds_200_mb, steps=2, warmup=1, device=cpu)
    idle = measure_step(lambda: None, steps=2, warmup=1, device=cpu)
    assert 190 <= busy.working_set_mb <= 260 and busy.peak_mb > busy.working_set_mb
    assert idle.working_set_mb < 20 and busy.step_ms > 0
