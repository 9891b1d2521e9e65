"""One record per engine (src.engines): the flag's choices, --explain-engine, the benchmark and the audit
all read it, so a new engine is one record plus its attach code."""
from __future__ import annotations

import pytest

import vision
from benchmarks import engines as benchmark
from experiments.audit import build_parser as audit_parser
from src.cli import build_parser
from src.engines import ENGINE_NAMES, ENGINES, PRIVATE_ENGINES


def test_every_listing_comes_from_the_registry():
    engine_flag = next(a for a in build_parser()._actions if a.dest == "engine")
    assert tuple(engine_flag.choices) == ENGINE_NAMES
    assert benchmark.ENGINES == ["non-private", *PRIVATE_ENGINES] and set(benchmark.ENGINE_LABELS) == set(ENGINES)
    audit_engine = next(a for a in audit_parser()._actions if a.dest == "engine")
    assert tuple(audit_engine.choices) == PRIVATE_ENGINES and "non-private" not in PRIVATE_ENGINES


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_explain_engine_uses_the_records_summary(engine, capsys):
    assert vision.main(["--dataset", "mnist", "--engine", engine, "--explain-engine"]) == 0
    out = capsys.readouterr().out
    assert ENGINES[engine].summary in out and out.count("| features.") == 2
