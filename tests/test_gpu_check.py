"""``benchmarks.gpu_check``, the one script run on the first GPU: without CUDA it refuses in one line and writes
nothing; its search, arithmetic, budget and report are checked on the CPU, and its measuring functions run here
on tiny sizes, so the code is known to work before a GPU sees it. The CUDA tests are marked ``gpu``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from tests.conftest import REPO

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The headline command's step shrunk to seconds on one CPU thread: 16 examples, one PGD step, one view.
TINY_HEADLINE = ("--train-subset", 16, "--batch-size", 4, "--physical-batch-size", 1, "--augmult", 1,
                 "--pgd-steps", 1)


def _args(*argv):
    args = gpu_check.build_parser().parse_args([str(a) for a in argv])
    args.started = time.monotonic()
    return args


def _summary(part, result):
    """The summary's lines for one finished part (after the environment line)."""
    report = gpu_check.GpuCheckReport(environment={}, budget_s=1, parts_requested=[part],
                                      parts={part: {"status": "done", "result": result}})
    return "\n".join(gpu_check.summary_lines(report)[1:])


def test_without_a_gpu_it_says_so_in_one_line_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "tmp" / "x.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, on any machine
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [gpu_check.NO_CUDA]
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("argv, message", [(["--parts", "tests,warp"], "unknown part warp"),
                                           (["--budget-s", "0"], "expected a positive number"),
                                           (["--engines", "bk,nope"], "unknown engine nope"),
                                           (["--batches", "two"], "expected a positive number")])
def test_a_bad_flag_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith(gpu_check.PROG)


def _fits_below(largest):
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= largest
    return fits, calls


def test_the_largest_batch_is_bracketed_by_doubling_then_bisected_to_a_sixteenth():
    fits, calls = _fits_below(1000)
    search = gpu_check.search_largest_batch(fits, start=16, limit=2 ** 15)
    assert calls[:7] == [16, 32, 64, 128, 256, 512, 1024]  # doubling until the first failure
    assert search.stopped == "bisected" and search.largest <= 1000 < search.smallest_failed
    assert search.smallest_failed - search.largest <= search.largest // 16 and search.largest >= 1000 * 15 / 16
    assert [b for b, _ in search.tries] == calls and all(ok == (b <= 1000) for b, ok in search.tries)


def test_the_search_stops_at_the_limit_halves_below_the_start_and_reports_none_fitting():
    at_limit = gpu_check.search_largest_batch(lambda b: True, start=16, limit=100)
    assert (at_limit.largest, at_limit.smallest_failed, at_limit.stopped) == (100, None, "limit")
    assert [b for b, _ in at_limit.tries] == [16, 32, 64, 100]
    fits, calls = _fits_below(5)
    below = gpu_check.search_largest_batch(fits, start=16, limit=100)
    assert calls[:3] == [16, 8, 4] and below.largest == 5 and below.smallest_failed == 6
    nothing = gpu_check.search_largest_batch(lambda b: False, start=4, limit=100)
    assert (nothing.largest, nothing.smallest_failed, nothing.stopped) == (None, 1, "none-fit")


def test_the_search_stops_when_time_runs_out_with_what_it_has():
    fits, calls = _fits_below(1000)
    ticks = iter([False, False, False, True])
    search = gpu_check.search_largest_batch(fits, start=16, limit=2 ** 15, out_of_time=lambda: next(ticks))
    assert search.stopped == "time" and calls == [16, 32, 64] and search.largest == 64
    assert search.as_dict()["tries"][-1] == {"batch": 64, "fits": True}


def test_a_try_that_runs_out_of_memory_or_fails_otherwise_does_not_fit(monkeypatch):
    """Out of memory is a plain no; another failure (a kernel's size limit, say) is a no kept in ``errors``, so
    the search still finds the largest batch that works."""
    from types import SimpleNamespace

    def fake_bench(model_name, norm, batch, engine, device):
        if batch >= 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if batch == 6:
            raise RuntimeError("kernel launch limit\nsecond line")
        return SimpleNamespace(training=None, images=None, labels=None, views=None)

    monkeypatch.setattr("benchmarks.setup.bench_training", fake_bench)
    monkeypatch.setattr("src.loop._physical_step", lambda *args, **kwargs: None)
    monkeypatch.setattr(gpu_check, "release_memory", lambda device: None)
    fits = gpu_check.FitsOnDevice("bk", CPU)
    search = gpu_check.search_largest_batch(fits, start=2, limit=64)
    assert (search.largest, search.smallest_failed, search.stopped) == (5, 6, "bisected")
    assert fits.errors == [{"batch": 6, "error": "RuntimeError: kernel launch limit"}]
    assert gpu_check.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling x"))
    assert not gpu_check.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_an_epoch_and_the_run_are_extrapolated_from_the_poisson_schedule():
    """The headline plan: n 50000, logical batch 4096 -> 13 steps an epoch of 3846 expected examples; 72 epochs."""
    from src.accounting import poisson_schedule

    schedule = poisson_schedule(50000, 4096)
    assert (schedule.steps_per_epoch, schedule.expected_batch_size) == (13, 3846)
    e = gpu_check.extrapolate(0.5, physical_batch_size=128, expected_batch_size=3846, steps_per_epoch=13,
                              steps=13 * 72)
    assert e["physical_batches_per_step"] == pytest.approx(3846 / 128)
    assert e["epoch_s"] == pytest.approx(13 * 3846 / 128 * 0.5)  # about 50000 / 128 batches of 0.5 s
    assert e["run_s"] == pytest.approx(72 * e["epoch_s"]) and e["run_h"] == pytest.approx(e["run_s"] / 3600)


def test_each_part_gets_its_share_of_what_is_left():
    budget = gpu_check.Budget(total_s=480, started=100.0, reserve_s=15)
    assert budget.allot(0.4, 0.6, now=100.0) == pytest.approx(0.4 * 465)
    assert budget.allot(0.15, 0.45, now=200.0) == pytest.approx(365 * 0.15 / 0.6)  # tests used 100 of 186 s
    assert budget.allot(1.0, 0.0, now=1000.0) == 0.0


def test_pytest_summaries_are_counted():
    counts = gpu_check.pytest_counts("....\nFAILED tests/x.py::t - boom\n"
                                     "1 failed, 7 passed, 1 skipped, 2 warnings in 80.12s (0:01:20)\n")
    assert {k: counts[k] for k in ("passed", "failed", "skipped", "errors")} == {"passed": 7, "failed": 1,
                                                                                  "skipped": 1, "errors": 0}
    assert counts["pytest_seconds"] == 80.12 and counts["summary_found"]
    assert gpu_check.pytest_counts("===== 9 skipped, 1 error in 3.2s =====")["errors"] == 1
    assert gpu_check.pytest_counts("collected 9 items\nKilled")["summary_found"] is False


def test_the_report_is_written_atomically_and_read_back_by_its_class(tmp_path):
    path = tmp_path / "new" / "results_gpu.json"
    report = gpu_check.GpuCheckReport(environment={"device": "x"}, budget_s=480, parts_requested=["engines"],
                                      parts={"engines": {"status": "done", "result": [{"step_ms": math.nan}]}})
    report.write(path)
    assert [p.name for p in path.parent.iterdir()] == ["results_gpu.json"]  # no temporary file left
    again = gpu_check.GpuCheckReport.load(path)
    assert again.parts["engines"]["result"] == [{"step_ms": None}]  # JSON has no NaN
    assert again.tool == "benchmarks.gpu_check" and again.complete is False


def test_parts_out_of_time_record_what_they_skipped(tmp_path):
    """A budget already spent: every engine and search is skipped, said so, and the report is complete."""
    out = tmp_path / "r.json"
    args = _args("--parts", "max-batch,engines", "--budget-s", 1, "--engines", "non-private,bk", "--out", out)
    report = gpu_check.run_check(args, CPU)
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["parts_requested"] == ["engines", "max-batch"]  # registry order
    assert all(row.get("skipped") == "time budget" for part in saved["parts"].values() for row in part["result"])
    assert len(saved["skipped_for_time"]) == 6  # 2 engines x fp32, bf16, and 2 searches
    lines = gpu_check.summary_lines(report)
    assert any(line.startswith("skipped for time:") for line in lines)


def test_a_part_that_crashes_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.PARTS, "engines", gpu_check.Part(lambda ctx: 1 / 0, 0.2))
    args = _args("--parts", "engines,max-batch", "--budget-s", 1, "--out", tmp_path / "r.json")
    report = gpu_check.run_check(args, CPU)
    crashed = report.parts["engines"]
    assert crashed["status"] == "failed" and crashed["error"] == "ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in crashed["traceback"][-1] and report.parts["max-batch"]["status"] == "done"
    out = capsys.readouterr().out
    assert "gpu_check: [engines] failed in" in out and "gpu_check: [max-batch] done in" in out


def test_the_headline_slice_runs_on_the_cpu_on_real_data(tiny_root):
    """vision.py's headline command (ResNet-18, bk, robust PGD, augmentation, EMA) through the run's own setup,
    shrunk; the plan is that of the run (72 epochs), and the partial CIFAR-10 on disk is used and noted."""
    result = gpu_check.headline_slice(CPU, data_root=str(tiny_root), warmup=1, batches=1,
                                      deadline=time.monotonic() + 120, extra_argv=TINY_HEADLINE)
    assert result["data"] == "real" and any("partial CIFAR-10" in note for note in result["notes"])
    assert result["settings"]["engine"] == "bk" and result["settings"]["attack"] == "pgd"
    assert result["plan"]["epochs"] == 72 and result["plan"]["n_train"] == 16 and result["timed_batches"] == 1
    e = result["extrapolated"]
    assert e["seconds_per_physical_batch"] > 0 and e["run_s"] == pytest.approx(e["epoch_s"] * 72)
    assert "headline (real data, bk, physical batch 1 x1 views, pgd-1)" in _summary("headline", result)


def test_the_headline_slice_falls_back_to_synthetic_data_and_says_why(tmp_path):
    result = gpu_check.headline_slice(CPU, data_root=str(tmp_path / "empty"), warmup=1, batches=3,
                                      deadline=time.monotonic() - 1, extra_argv=TINY_HEADLINE)
    assert result["data"] == "synthetic" and "CIFAR10 not found" in result["reason"]
    assert result["n_loaded"] == 16 and result["timed_batches"] == 0 and "extrapolated" not in result  # no time
    assert gpu_check.time_skips("headline", result) == ["headline: timed 0 of 3 physical batches"]


def test_engine_throughput_runs_on_the_cpu_and_records_refusals():
    rows = gpu_check.engine_throughput(CPU, engines=("non-private", "hooks"), precisions=("fp32",), batch=2,
                                       warmup=1, steps=1, deadline=time.monotonic() + 120)
    assert [r["engine"] for r in rows] == ["non-private", "hooks"] and all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["vs_non_private"] == 1.0 and rows[1]["vs_non_private"] > 0
    refused = gpu_check.engine_throughput(CPU, engines=("hooks",), precisions=("bf16",), batch=2, warmup=1,
                                          steps=1, deadline=time.monotonic() + 120)
    assert "needs --engine bk or non-private" in refused[0]["skipped"]
    assert _summary("engines", rows + refused).startswith("images/s at batch 2, fp32: non-private ")


def test_the_batch_search_runs_a_real_engine_on_the_cpu():
    rows = gpu_check.largest_batches(CPU, engines=("bk",), start=1, limit=2, deadline=time.monotonic() + 120)
    assert rows[0]["largest"] == 2 and rows[0]["stopped"] == "limit" and "error" not in rows[0]
    assert _summary("max-batch", rows) == "largest batch (fp32, 32x32): bk 2+"


def test_the_tests_part_runs_pytest_in_a_subprocess_and_counts(tmp_path):
    """A stand-in for tests/test_gpu.py (which would run for minutes on a GPU): counts, the failure's output."""
    stand_in = tmp_path / "test_stand_in.py"
    stand_in.write_text("import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'boom'\n\n"
                        "@pytest.mark.skip(reason='no')\ndef test_skip():\n    pass\n")
    result = gpu_check.run_gpu_tests(60, test_path=str(stand_in))
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 1, 1)
    assert result["summary_found"] and result["returncode"] == 1 and not result["timed_out"]
    assert any("boom" in line for line in result["output_tail"])
    assert (REPO / gpu_check.run_gpu_tests.__kwdefaults__["test_path"]).is_file()


def test_a_test_run_past_its_limit_is_killed_and_said_so(tmp_path):
    stand_in = tmp_path / "test_slow.py"
    stand_in.write_text("import time\n\ndef test_slow():\n    time.sleep(60)\n")
    result = gpu_check.run_gpu_tests(2, test_path=str(stand_in))
    assert result["timed_out"] and not result["summary_found"] and result["seconds"] < 30
    assert gpu_check.time_skips("tests", result)[0].startswith("tests: killed after")
    assert _summary("tests", result).endswith("(killed: out of time)")


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_the_check_times_the_headline_engines_and_batch_search(tmp_path):
    """The script itself on a GPU, shrunk: two engines, a small batch search, two timed headline batches."""
    out = tmp_path / "results_gpu.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--parts", "headline,engines,max-batch",
                           "--engines", "non-private,bk", "--engine-batch", "32", "--max-batch-limit", "64",
                           "--warmup", "1", "--batches", "2", "--budget-s", "400", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = gpu_check.GpuCheckReport.load(out)
    assert report.complete and report.environment["cuda"] and report.environment["device_memory_gb"] > 0
    headline = report.parts["headline"]["result"]
    assert headline["extrapolated"]["run_s"] > 0 and headline["settings"]["physical_batch_size"] == 128
    engines = report.parts["engines"]["result"]
    assert {(r["engine"], r["precision"]) for r in engines if "images_per_s" in r} == {
        (e, p) for e in ("non-private", "bk") for p in ("fp32", "bf16")}
    assert [r["largest"] for r in report.parts["max-batch"]["result"]] == [64, 64]
    assert "[engines] done" in done.stdout and "images/s at batch 32, bf16" in done.stdout
