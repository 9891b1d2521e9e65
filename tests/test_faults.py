"""Broken data and faults during a run.

Broken inputs (truncated or corrupted files, wrong shapes, empty sets, an unusable data root or output
folder) are refused before training with one line on stderr and exit code 2, and leave no run directory.
Faults during a run (a full disk, a loss or weights turning non-finite) end it with a recorded status,
one line on stderr, no traceback, and the last good checkpoint in place.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import vision
from src import checkpoint
from tests.conftest import write_cifar10_partial, write_idx, write_mnist_like

TINY = ["--train-subset", 64, "--batch-size", 16, "--epochs", 1, "--wandb", "disabled"]


def _mnist_root(base: Path, name: str = "MNIST") -> Path:
    root = base / "root"
    write_mnist_like(root, "MNIST", 120, 40, seed=1)
    write_mnist_like(root, "KMNIST", 140, 20, seed=2)
    return root


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def truncated_mnist_images(base):
    root = _mnist_root(base)
    _truncate(root / "MNIST" / "raw" / "train-images-idx3-ubyte")
    return root, []


def corrupted_mnist_labels(base):
    root = _mnist_root(base)
    path = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x13\x37" + os.urandom(200))
    return root, []


def label_count_mismatch(base):
    root = _mnist_root(base)
    images = np.zeros((120, 28, 28), np.uint8)
    write_idx(root / "MNIST" / "raw", "train", images, np.zeros(100, np.uint8))
    return root, []


def wrong_image_size(base):
    root = _mnist_root(base)
    write_idx(root / "MNIST" / "raw", "train", np.zeros((120, 32, 32), np.uint8), np.zeros(120, np.uint8))
    return root, []


def empty_training_set(base):
    root = _mnist_root(base)
    write_idx(root / "MNIST" / "raw", "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    return root, ["--train-subset", 1, "--batch-size", 1]


def truncated_cifar_batch(base):
    root = base / "root"
    write_cifar10_partial(root, 96, 32, seed=3)
    _truncate(root / "cifar-10-batches-py" / "data_batch_1")
    return root, ["--dataset", "cifar10"]


def data_root_is_a_file(base):
    root = base / "not_a_folder"
    root.write_text("data")
    return root, ["--no-download"]


def truncated_public_npz(base):
    root = _mnist_root(base)
    path = base / "public.npz"
    np.savez(path, x=np.zeros((50, 28, 28), np.uint8))
    _truncate(path)
    return root, ["--norm", "bn-public", "--public-data", path, "--public-size", 20]


def float_public_images(base):
    root = _mnist_root(base)
    path = base / "public.npz"
    np.savez(path, x=np.zeros((50, 28, 28), np.float32))
    return root, ["--norm", "bn-public", "--public-data", path, "--public-size", 20]


def truncated_public_kmnist(base):
    root = _mnist_root(base)
    _truncate(root / "KMNIST" / "raw" / "train-images-idx3-ubyte", keep=0.1)
    return root, ["--norm", "bn-public", "--no-download"]


def resume_corrupted_checkpoint(base):
    root = _mnist_root(base)
    run = base / "out" / "broken"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"dataset": "mnist"}}))
    (run / "summary.json").write_text(json.dumps({"status": "failed"}))
    return root, ["--resume", run]


def resume_truncated_checkpoint(base):
    """A real run directory whose checkpoint.pt was cut short (the write itself is atomic; a copy may not be)."""
    root = _mnist_root(base)
    out = base / "out"
    assert vision.main([str(a) for a in ["--dataset", "mnist", "--data-root", root, "--out", out,
                                         "--run-id", "cut", *TINY]]) == 0
    summary = json.loads((out / "cut" / "summary.json").read_text())
    (out / "cut" / "summary.json").write_text(json.dumps(dict(summary, status="failed")))
    _truncate(out / "cut" / "checkpoint.pt")
    return root, ["--resume", out / "cut"]


BROKEN_INPUTS = [
    (truncated_mnist_images, "unreadable"),
    (corrupted_mnist_labels, "unreadable"),
    (label_count_mismatch, "unreadable"),
    (wrong_image_size, "do not match"),
    (empty_training_set, "unreadable"),
    (truncated_cifar_batch, "unreadable"),
    (data_root_is_a_file, "not found"),
    (truncated_public_npz, "unreadable (BadZipFile"),
    (float_public_images, "uint8 image array, found none"),
    (truncated_public_kmnist, "unreadable"),
    (resume_corrupted_checkpoint, "does not describe a run"),
    (resume_truncated_checkpoint, "cannot read"),
]


def _invoke(argv) -> int:
    try:
        return vision.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def _run_dirs(out: Path) -> dict:
    """Every file under ``out`` with its bytes, to prove a refused request changed nothing."""
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}


@pytest.mark.slow
@pytest.mark.parametrize("break_input,expected", BROKEN_INPUTS, ids=[c[0].__name__ for c in BROKEN_INPUTS])
def test_broken_input_is_refused_in_one_line(break_input, expected, tmp_path, capsys):
    root, extra = break_input(tmp_path)
    out = tmp_path / "out"
    before = _run_dirs(out)
    capsys.readouterr()
    argv = ["--data-root", root, "--out", out, *TINY, *extra]
    if "--resume" in extra:
        argv = ["--data-root", root, *extra]
    elif "--dataset" not in extra:
        argv = ["--dataset", "mnist", *argv]
    code = _invoke(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith("vision.py: error:"), captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _run_dirs(out) == before, "a refused request changed the output folder"


def test_read_only_output_folder_is_refused(tiny_root, tmp_path, capsys, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, who can write anywhere)."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if read_only in (self, *self.parents) and self != read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code = _invoke(["--dataset", "mnist", "--data-root", tiny_root, "--out", read_only, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create run directory" in err and "Read-only file system" in err
    assert len(err.strip().splitlines()) == 1 and list(read_only.iterdir()) == []


def _fail_writes_of(name: str, after: int, monkeypatch) -> list:
    """Make the ``after``-th and later fsyncs of ``name`` fail as on a full disk; returns the call log."""
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if Path(target).name.startswith(f".{name}."):
            calls.append(target)
            if len(calls) >= after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def _two_epochs(root, out, run_id, *extra):
    return ["--dataset", "mnist", "--data-root", root, "--out", out, "--run-id", run_id, "--train-subset", 96,
            "--batch-size", 16, "--epochs", 2, "--noise", 1.0, "--wandb", "disabled", "--eval-robust-size", 0,
            *extra]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is synced")
def test_full_disk_during_a_run_fails_it_and_keeps_the_last_good_checkpoint(tiny_root, tmp_path, capsys,
                                                                            monkeypatch):
    calls = _fail_writes_of(checkpoint.CHECKPOINT_FILE, after=2, monkeypatch=monkeypatch)
    code = _invoke(_two_epochs(tiny_root, tmp_path, "full"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and len(calls) == 2
    assert "No space left on device" in line and "checkpoint.pt" in line
    run = tmp_path / "full"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["reason"]
    kept = checkpoint.load(run)
    assert checkpoint.position_of(kept).epoch == 1, "the epoch-1 checkpoint must survive the failed write"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "a half-written file was left behind"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_root, tmp_path, capsys, monkeypatch):
    """After the first checkpoint, every training image turns NaN: the step after makes the weights NaN,
    the run stops there as diverged (a check of the weights, not of the private loss), and checkpoint.pt
    and model.pt stay those of epoch 1."""
    import src.loop as loop

    saved, real_save, real_step = [], checkpoint.save, loop._physical_step
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (saved.append(1), real_save(*a, **k)))
    monkeypatch.setattr(loop, "_physical_step", lambda training, images, labels, adversarial=None, **kw: real_step(
        training, images * float("nan") if saved else images, labels, adversarial, **kw))
    code = _invoke(_two_epochs(tiny_root, tmp_path, "nan"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "weights non-finite" in line
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs"] == 1
    kept = checkpoint.load(tmp_path / "nan")
    assert checkpoint.position_of(kept).epoch == 1
    model = torch.load(tmp_path / "nan" / "model.pt")
    assert all(torch.equal(model[k], kept["model"][k]) and torch.isfinite(model[k].float()).all() for k in model)


def test_infinite_gradients_stop_the_run_before_weights_are_saved(tiny_root, tmp_path, capsys, monkeypatch):
    """A finite loss whose gradient is infinite (injected with a tensor hook, non-private engine)."""
    import src.train as train

    saved, real_save, real_attach = [], checkpoint.save, train.attach
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (saved.append(1), real_save(*a, **k)))

    def attach(*args, **kwargs):
        training = real_attach(*args, **kwargs)
        first = next(training.base_model.parameters())
        first.register_hook(lambda grad: grad * float("inf") if saved else grad)
        return training

    monkeypatch.setattr(train, "attach", attach)
    code = _invoke(["--dataset", "mnist", "--data-root", tiny_root, "--out", tmp_path, "--run-id", "inf",
                    "--train-subset", 96, "--batch-size", 16, "--epochs", 2, "--engine", "non-private",
                    "--wandb", "disabled", "--eval-robust-size", 0])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "non-finite" in line
    summary = json.loads((tmp_path / "inf" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs"] == 1
    model = torch.load(tmp_path / "inf" / "model.pt")
    assert all(torch.isfinite(v.float()).all() for v in model.values())
    assert checkpoint.position_of(checkpoint.load(tmp_path / "inf")).epoch == 1


@pytest.mark.slow
def test_faults_leave_other_run_directories_alone(tiny_root, tmp_path, capsys, monkeypatch):
    """A run that fails on a full disk next to a finished run does not touch the finished one."""
    assert _invoke(_two_epochs(tiny_root, tmp_path, "done")) == 0
    before = _run_dirs(tmp_path / "done")
    _fail_writes_of(checkpoint.CHECKPOINT_FILE, after=1, monkeypatch=monkeypatch)
    assert _invoke(_two_epochs(tiny_root, tmp_path, "next")) == 1
    capsys.readouterr()
    assert _run_dirs(tmp_path / "done") == before
    assert json.loads((tmp_path / "next" / "summary.json").read_text())["status"] == "failed"
