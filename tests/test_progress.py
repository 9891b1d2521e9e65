"""What a run shows while it trains (``src.progress``): examples per second per physical batch, the one-line
estimate of the epoch and the run, the slow-CPU note, and a log line at least every minute when the output is
a file. A fake clock drives it, so nothing here waits."""
from __future__ import annotations

import io

import pytest

from src.progress import ESTIMATE_AFTER_BATCHES, RunShape, TrainingProgress, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress(epochs=10, examples=50000.0, device="cpu", **kwargs):
    clock, stream = Clock(), io.StringIO()
    shown = TrainingProgress(RunShape(epochs=epochs, examples_per_epoch=examples, device=device), stream=stream,
                             out=stream, clock=clock, live=False, **kwargs)
    return shown, clock, stream


def test_the_estimate_goes_with_the_run_line_and_the_log_lines_with_the_bar():
    clock, bar_stream, out = Clock(), io.StringIO(), io.StringIO()
    shown = TrainingProgress(RunShape(epochs=1, examples_per_epoch=1e6), stream=bar_stream, out=out, clock=clock,
                             live=False, log_every=60.0)
    with shown.epoch_of(1):
        for _ in range(ESTIMATE_AFTER_BATCHES + 1):
            clock.now += 0.01
            shown.physical_batch(100)
        clock.now += 61
        shown.tick()
    assert out.getvalue().startswith("estimate: 10,000 img/s on cpu") and "estimate" not in bar_stream.getvalue()
    assert bar_stream.getvalue().startswith("epoch 1/1: 400/1000000 images")


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (5, 125, 1500, 3 * 3600 + 300, 3 * 86400)] == ["5s", "2m05s", "25m", "3h05m",
                                                                              "3d00h"]
    assert duration(float("inf")) == "unknown"


def test_the_estimate_comes_once_after_the_first_batches_and_excludes_the_warm_up():
    shown, clock, stream = _progress(epochs=10, examples=1000.0)
    with shown.epoch_of(1):
        clock.now += 30  # the first batch: warm-up, not timed
        shown.physical_batch(100)
        for _ in range(ESTIMATE_AFTER_BATCHES):
            assert "estimate" not in stream.getvalue()
            clock.now += 10  # 100 examples in 10 s: 10 img/s
            shown.physical_batch(100)
        assert shown.rate == pytest.approx(10.0)
        clock.now += 10
        shown.physical_batch(100)
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("estimate")]
    # 1000 examples an epoch at 10 img/s: 100 s an epoch, 1000 s for 10 epochs; 400 done when it is printed
    assert lines == ["estimate: 10 img/s on cpu: about 1m40s per epoch, 16m for 10 epoch(s) of training "
                     "(16m left; evaluations add to it)"]
    assert "note:" not in stream.getvalue()  # 17 minutes is not long


def test_a_run_of_hours_on_a_cpu_names_the_faster_options():
    shown, clock, stream = _progress(epochs=72, examples=50000.0)
    with shown.epoch_of(1):
        for _ in range(ESTIMATE_AFTER_BATCHES + 1):
            clock.now += 60  # 128 examples a minute: the CIFAR-10 recipe on 2 cores
            shown.physical_batch(128)
    text = stream.getvalue()
    assert "for 72 epoch(s)" in text and "note: that is long for a CPU; faster: --device cuda" in text
    assert "--model scatternet-linear" in text
    gpu, clock, stream = _progress(epochs=72, examples=50000.0, device="cuda")
    with gpu.epoch_of(1):
        for _ in range(ESTIMATE_AFTER_BATCHES + 1):
            clock.now += 60
            gpu.physical_batch(128)
    assert "estimate" in stream.getvalue() and "note:" not in stream.getvalue()


def test_a_log_file_gets_a_line_at_least_every_minute_even_inside_a_long_batch():
    shown, clock, stream = _progress(epochs=2, examples=1000.0, log_every=60.0)
    with shown.epoch_of(1):
        clock.now += 59
        shown.tick()
        assert stream.getvalue() == ""
        clock.now += 2  # one minute without a line, still inside the first physical batch
        shown.tick()
        assert stream.getvalue().splitlines() == ["epoch 1/2: 0/1000 images (0.0%), current physical batch "
                                                  "running for 1m01s"]
        shown.physical_batch(100)
        clock.now += 20
        shown.physical_batch(100)  # 5 img/s from the timed batch
        clock.now += 60
        shown.tick()
        assert stream.getvalue().splitlines()[-1] == ("epoch 1/2: 200/1000 images (20.0%), 5 img/s, epoch ETA 2m40s, "
                                                      "run ETA 6m00s, current physical batch running for 1m00s")
    with shown.evaluating(1):
        clock.now += 61
        shown.tick()
    assert stream.getvalue().splitlines()[-1] == "evaluating epoch 1 for 1m01s"


def test_a_terminal_gets_the_live_bar_and_no_log_lines():
    clock, stream = Clock(), io.StringIO()
    shown = TrainingProgress(RunShape(epochs=1, examples_per_epoch=100.0), stream=stream, out=stream, clock=clock,
                             live=True)
    with shown.epoch_of(1):
        shown.physical_batch(40)
        clock.now += 120
        shown.tick()
    assert "40/100" in stream.getvalue() and "epoch 1/1" in stream.getvalue()
    assert "images (" not in stream.getvalue()  # no log line beside the bar


def test_a_disabled_progress_prints_nothing():
    shown, clock, stream = _progress(enabled=False)
    with shown.heartbeat(poll=0.01), shown.epoch_of(1):
        for _ in range(5):
            clock.now += 100
            shown.physical_batch(10)
            shown.tick()
    assert stream.getvalue() == ""


@pytest.mark.slow
def test_a_training_run_shows_nominal_counts_never_the_sampled_batch_sizes(tiny_root, tmp_path, monkeypatch):
    """A Poisson batch's size is a count over the private set: the bar advances by the physical batch size
    capped at the expected batch, whatever sizes the sampler drew."""
    import src.loop as loop
    import vision
    from src.progress import TrainingProgress as Shown

    shown, sampled = [], []
    real_batch, real_step = Shown.physical_batch, loop._physical_step
    monkeypatch.setattr(Shown, "physical_batch", lambda self, examples: (shown.append(examples),
                                                                         real_batch(self, examples))[1])
    monkeypatch.setattr(loop, "_physical_step", lambda training, images, *a, **k: (sampled.append(len(images)),
                                                                                   real_step(training, images, *a, **k))[1])
    code = vision.main(["--dataset", "mnist", "--data-root", str(tiny_root), "--train-subset", "240", "--batch-size",
                        "32", "--physical-batch-size", "16", "--epochs", "1", "--noise", "1.0", "--eval-robust-size",
                        "0", "--wandb", "disabled", "--out", str(tmp_path), "--run-id", "run", "--seed", "0"])
    assert code == 0 and len(shown) == len(sampled) > 0
    import json

    expected = json.loads((tmp_path / "run" / "config.json").read_text())["plan"]["expected_batch_size"]
    nominal = {0, 16, expected % 16}  # what the schedule alone gives: full physical batches, then the remainder
    assert set(sampled) - nominal, "the sampler drew batches of other sizes: the check below could fail"
    assert set(shown) <= nominal
