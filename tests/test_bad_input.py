"""Every invalid flag, impossible combination or missing/broken input: one line on stderr, exit code 2,
no traceback, and no run directory left behind."""
from __future__ import annotations


import json

import pytest
import torch

import vision
from src.config import build_config
from src.datasets import get_dataset
from tests.conftest import run_cli

TINY = ["--train-subset", 64, "--batch-size", 16, "--epochs", 1, "--wandb", "disabled"]

# (id, arguments after --out, expected words in the message). "{root}" is the tiny data root.
BAD_COMMAND_LINES = [
    ("unknown-dataset", ["--dataset", "imagenet"], "invalid choice"),
    ("unknown-flag", ["--dataset", "mnist", "--frobnicate"], "unrecognized arguments"),
    ("not-a-number", ["--dataset", "mnist", "--lr", "fast"], "expected a number"),
    ("negative-noise", ["--dataset", "mnist", "--noise", "-1"], "--noise must be positive"),
    ("zero-noise", ["--dataset", "mnist", "--noise", "0"], "non-private"),
    ("zero-clip", ["--dataset", "mnist", "--clip", "0"], "--clip must be positive"),
    ("negative-clip", ["--dataset", "mnist", "--clip", "-0.5"], "--clip must be positive"),
    ("physical-above-logical", ["--dataset", "mnist", "--batch-size", "256", "--physical-batch-size", "512"],
     "larger than --batch-size"),
    ("noise-and-target", ["--dataset", "mnist", "--noise", "1", "--target-epsilon", "3"], "not both"),
    ("unreachable-target", ["--dataset", "mnist", "--target-epsilon", "1e-9", "--dry-run"], "cannot be met"),
    ("unreachable-target-run", ["--dataset", "mnist", "--train-subset", "200", "--batch-size", "50",
                                "--target-epsilon", "1e-9"], "cannot be met"),
    ("gdp-is-not-a-guarantee", ["--dataset", "mnist", "--target-epsilon", "50", "--accountant", "gdp", "--dry-run"],
     "gdp is a central-limit approximation"),
    ("delta-too-large", ["--dataset", "mnist", "--train-subset", "200", "--batch-size", "50", "--delta", "0.01"],
     "below 1/n"),
    ("delta-zero", ["--dataset", "mnist", "--delta", "0"], "--delta must be in"),
    ("bn-public-without-public-set", ["--dataset", "cifar10", "--norm", "bn-public", "--no-download"],
     "--public-holdout"),
    ("unknown-norm", ["--dataset", "mnist", "--norm", "batch"], "invalid choice"),
    ("zero-epochs", ["--dataset", "mnist", "--epochs", "0"], "--epochs must be at least 1"),
    ("zero-batch", ["--dataset", "mnist", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("zero-lr", ["--dataset", "mnist", "--lr", "0"], "--lr must be positive"),
    ("momentum-out-of-range", ["--dataset", "mnist", "--momentum", "1.5"], "--momentum must be in"),
    ("momentum-with-adam", ["--dataset", "mnist", "--optimizer", "adam", "--momentum", "0.9"], "adam"),
    ("noise-without-privacy", ["--dataset", "mnist", "--engine", "non-private", "--noise", "1"], "non-private"),
    ("unknown-engine", ["--dataset", "mnist", "--engine", "turbo"], "invalid choice"),
    ("holdout-on-mnist", ["--dataset", "mnist", "--public-holdout"], "not available for mnist"),
    ("holdout-and-public-file", ["--dataset", "cifar10", "--public-holdout", "--public-data", "x.npz"],
     "give one of them"),
    ("subset-too-large-dry", ["--dataset", "mnist", "--train-subset", "70000", "--dry-run"], "larger than"),
    ("batch-above-n", ["--dataset", "mnist", "--train-subset", "100", "--batch-size", "200",
                       "--physical-batch-size", "100"], "larger than the 100"),
    ("zero-subset", ["--dataset", "mnist", "--train-subset", "0"], "--train-subset must be at least 1"),
    ("bad-run-id", ["--dataset", "mnist", "--run-id", "../elsewhere"], "--run-id"),
    # PRV's domain overflows at such low noise in 2 steps (at noise 0.5 it takes 1000 steps, and 20 s to find out).
    ("prv-cannot-bound", ["--dataset", "mnist", "--noise", "0.02", "--batch-size", "30000", "--epochs", "1",
                          "--accountant", "prv", "--dry-run"], "cannot bound epsilon"),
    # Robust training and evaluation (attacks issue).
    ("robust-flag-without-robust", ["--dataset", "mnist", "--adv-ratio", "0.5"], "needs --robust"),
    ("train-steps-without-robust", ["--dataset", "mnist", "--pgd-steps", "5"], "needs --robust"),
    ("adv-ratio-above-one", ["--dataset", "mnist", "--robust", "--adv-ratio", "1.5"], "--adv-ratio must be in [0, 1]"),
    ("negative-radius", ["--dataset", "mnist", "--robust", "--pgd-eps", "-0.1"], "--pgd-eps must be positive"),
    ("linf-radius-beyond-pixels", ["--dataset", "mnist", "--pgd-eps", "2"], "beyond the [0, 1] pixel range"),
    ("unknown-radius-name", ["--dataset", "mnist", "--pgd-eps", "huge"], "unknown --pgd-eps 'huge'"),
    ("fgsm-with-l2", ["--dataset", "mnist", "--robust", "--attack", "fgsm-rs", "--pgd-norm", "l2"],
     "L-infinity attack"),
    ("zero-pgd-steps", ["--dataset", "mnist", "--robust", "--pgd-steps", "0"], "--pgd-steps must be at least 1"),
    ("zero-restarts", ["--dataset", "mnist", "--robust", "--pgd-restarts", "0"], "--pgd-restarts must be at least 1"),
    ("zero-eval-steps", ["--dataset", "mnist", "--eval-pgd-steps", "0"], "--eval-pgd-steps must be at least 1"),
    ("zero-eval-every", ["--dataset", "mnist", "--eval-robust-every", "0"], "--eval-robust-every must be at least 1"),
    ("masking-without-robust-eval", ["--dataset", "mnist", "--eval-robust-size", "0", "--masking-checks"],
     "need --eval-robust-size > 0"),
    ("unknown-pgd-norm", ["--dataset", "mnist", "--pgd-norm", "l3"], "invalid choice"),
    ("eval-only-missing-run", ["--dataset", "mnist", "--eval-only", "{empty}/nope"], "not a finished run directory"),
    ("eval-only-with-robust", ["--dataset", "mnist", "--eval-only", "{empty}", "--robust"], "trains nothing"),
    ("eval-only-with-dry-run", ["--dataset", "mnist", "--eval-only", "{empty}", "--dry-run"], "cannot be combined"),
    ("transfer-source-missing", ["--dataset", "mnist", "--data-root", "{root}", "--batch-size", "16",
                                 "--transfer-from", "{empty}/nope"],
     "not a finished run directory"),
    # Reliability (budget guard, secure RNG, checkpoints, resume).
    ("zero-max-epsilon", ["--dataset", "mnist", "--max-epsilon", "0"], "--max-epsilon must be positive"),
    ("max-epsilon-non-private", ["--dataset", "mnist", "--engine", "non-private", "--max-epsilon", "3"],
     "drop --max-epsilon"),
    ("target-above-budget", ["--dataset", "mnist", "--target-epsilon", "3", "--max-epsilon", "2"],
     "is above --max-epsilon 2"),
    ("budget-below-one-step", ["--dataset", "mnist", "--noise", "0.5", "--max-epsilon", "0.001", "--dry-run"],
     "does not allow a single step"),
    ("secure-rng-non-private", ["--dataset", "mnist", "--engine", "non-private", "--secure-rng"],
     "needs a private --engine"),
    ("zero-checkpoint-every", ["--dataset", "mnist", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
    ("no-dataset", ["--noise", "1"], "required: --dataset"),
    ("resume-missing-run", ["--resume", "{empty}/nope"], "is not a run directory"),
    ("resume-with-dry-run", ["--resume", "{empty}", "--dry-run"], "cannot be combined"),
    ("resume-without-checkpoint", ["--resume", "{run}"], "no checkpoint.pt to resume from"),
    ("resume-other-dataset", ["--resume", "{run}", "--dataset", "cifar10"], "not --dataset cifar10"),
    # Data problems, found before any run directory exists.
    ("missing-data", ["--dataset", "mnist", "--data-root", "{empty}", "--no-download"], "MNIST not found in"),
    ("missing-cifar", ["--dataset", "cifar10", "--data-root", "{empty}", "--no-download"], "CIFAR10 not found in"),
    ("subset-too-large", ["--dataset", "mnist", "--data-root", "{root}", "--train-subset", "100000"],
     "larger than the 240"),
    ("missing-public-file", ["--dataset", "mnist", "--data-root", "{root}", "--public-data", "{root}/nope.npz"],
     "does not exist"),
    ("too-many-public-images", ["--dataset", "mnist", "--data-root", "{root}", "--public-data",
                                "{root}/public105.npz", "--public-size", "128"], "more public images than the 105"),
    ("ambiguous-public-file", ["--dataset", "cifar10", "--data-root", "{root}", "--public-data",
                               "{root}/two_image_arrays.npz"], "exactly one uint8 image array"),
    ("public-shape-mismatch", ["--dataset", "cifar10", "--data-root", "{root}", "--public-data",
                               "{root}/public105.npz"], "do not match"),
    ("public-key-missing", ["--dataset", "mnist", "--data-root", "{root}", "--public-data",
                            "{root}/public105.npz:x_public"], "no array 'x_public'"),
    ("holdout-swallows-data", ["--dataset", "cifar10", "--data-root", "{root}", "--public-holdout",
                               "--public-size", "96"], "leaves no private images"),
    ("wandb-online-without-login", ["--dataset", "mnist", "--data-root", "{root}", "--wandb", "online"],
     "needs credentials"),
]


def invoke(argv) -> tuple:
    try:
        code = vision.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code


@pytest.mark.slow
@pytest.mark.parametrize("case_id,args,expected", BAD_COMMAND_LINES, ids=[c[0] for c in BAD_COMMAND_LINES])
def test_bad_command_line(case_id, args, expected, tiny_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with wandb credentials
    monkeypatch.setenv("PRV_DATA_ROOT", str(tiny_root))  # the data root when no --data-root is given
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "killed_before_first_checkpoint"  # what a run killed during its first epoch leaves
    run.mkdir()
    (run / "config.json").write_text(json.dumps(build_config(
        {"dataset": "mnist", "data_root": str(tiny_root), "out": str(tmp_path), "run_id": run.name,
         "train_subset": 64, "batch_size": 16},
        get_dataset("mnist").defaults).to_dict()))
    (run / "summary.json").write_text('{"status": "running"}')
    argv = [str(a).format(root=tiny_root, empty=empty, run=run) for a in args]
    if "--wandb" not in argv:
        argv += ["--wandb", "disabled"]
    out = tmp_path / "runs"
    code = invoke(argv if "--resume" in argv else ["--out", out, *argv])  # a resumed run has its own folder
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, f"expected one line on stderr, got: {captured.err!r}"
    assert lines[0].startswith("vision.py: error:"), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists() or not any(out.iterdir()), "a refused run left a run directory behind"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "summary.json"], "a refused resume wrote files"
    assert sorted(p.name for p in empty.iterdir()) == [], "a refused run wrote into the data root"


def test_existing_run_directory_is_not_touched(tiny_root, tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "summary.json").write_text('{"status": "finished"}')
    code = invoke(["--dataset", "mnist", "--data-root", tiny_root, "--out", out, "--run-id", "keep", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err
    assert (out / "keep" / "summary.json").read_text() == '{"status": "finished"}'
    assert sorted(p.name for p in (out / "keep").iterdir()) == ["summary.json"]


def test_output_folder_that_cannot_be_created(tiny_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = invoke(["--dataset", "mnist", "--data-root", tiny_root, "--out", blocker / "runs", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create run directory" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")
def test_cuda_without_a_gpu(tiny_root, tmp_path, capsys):
    code = invoke(["--dataset", "mnist", "--data-root", tiny_root, "--out", tmp_path, "--device", "cuda", *TINY])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_real_process_reports_one_line_and_exit_code_2(tmp_path):
    """The same contract holds for ``python vision.py`` itself, argparse errors included."""
    for args in (["--dataset", "mnist", "--clip", "-1", "--dry-run"], ["--dataset", "svhn"],
                 ["--dataset", "mnist", "--data-root", tmp_path / "none", "--no-download", "--out", tmp_path / "r"]):
        result = run_cli(*args, cwd=tmp_path, fresh_interpreter=True)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "none").exists()
