"""The engine benchmark's harness (not its timings): one configuration runs, ratios are against
non-private in the same run, failures are reported instead of hidden."""
from __future__ import annotations

import pytest

from benchmarks import engines


@pytest.mark.parametrize("engine", ["non-private", "bk"])
def test_one_configuration_measures_a_real_step(engine):
    result = engines.measure("lenet5", "bn-public", 8, engine, steps=1, warmup=1)
    assert result["step_ms"] > 0 and result["peak_mb"] > 0


def test_rows_are_ratios_against_non_private_of_the_same_run():
    config = ("resnet18", "group", 32)
    samples = {(config, "non-private"): [{"step_ms": 100.0, "peak_mb": 1000.0}, {"step_ms": 120.0, "peak_mb": 990.0}],
               (config, "bk"): [{"step_ms": 130.0, "peak_mb": 1100.0}, {"step_ms": 150.0, "peak_mb": 1050.0}],
               (config, "hooks"): [{"error": "out of memory"}]}
    rows = engines.summarise([config], ["non-private", "bk", "hooks"], samples)
    by_engine = {r["engine"]: r for r in rows}
    assert set(by_engine["bk"]) >= {"model", "norm", "batch", "engine", "step_ms", "peak_mb", "time_ratio", "mem_ratio"}
    assert by_engine["bk"]["step_ms"] == 140.0 and by_engine["bk"]["time_ratio"] == pytest.approx(140 / 110)
    assert by_engine["bk"]["mem_ratio"] == pytest.approx(1100 / 1000)
    assert by_engine["non-private"]["time_ratio"] == 1.0
    assert by_engine["hooks"]["error"] == "out of memory" and by_engine["hooks"]["time_ratio"] is None
    table = engines.markdown(rows)
    assert "failed: out of memory" in table and "1.27x" in table
