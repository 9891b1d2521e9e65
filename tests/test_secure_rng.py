"""--secure-rng: Opacus's secure mode (CSPRNG sampling and noise, floating-point-attack-safe Gaussian).

torchcsprng has no build for the torch in requirements.txt, so these tests stand in a module with its one
function (a generator seeded from the OS's entropy pool) to check that every engine routes sampling and
noise through it and turns Opacus's secure noise on; without the package the flag is refused."""
from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types

import pytest
import torch
from opacus.optimizers import optimizer as opacus_optimizer
from opacus.optimizers import optimizer_fast_gradient_clipping as opacus_fast_optimizer

import vision


@pytest.fixture
def stand_in_csprng(monkeypatch):
    created = []

    def create_random_device_generator(path):
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
        created.append(path)
        return generator

    module = types.ModuleType("torchcsprng")
    module.__spec__ = importlib.machinery.ModuleSpec("torchcsprng", None)
    module.create_random_device_generator = create_random_device_generator
    monkeypatch.setitem(sys.modules, "torchcsprng", module)
    return created


def _run(tiny_root, out, run_id, engine, *extra) -> dict:
    code = vision.main([str(a) for a in ["--dataset", "mnist", "--data-root", tiny_root, "--out", out, "--run-id",
                                         run_id, "--train-subset", 64, "--batch-size", 16, "--epochs", 1,
                                         "--noise", 1.0, "--engine", engine, "--wandb", "disabled",
                                         "--eval-robust-size", 0, *extra]])
    assert code == 0
    return torch.load(out / run_id / "model.pt")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["bk", "hooks"])
def test_secure_mode_draws_sampling_and_noise_from_the_csprng(engine, stand_in_csprng, tiny_root, tmp_path,
                                                              monkeypatch):
    secure_draws = []
    real_noise = opacus_optimizer._generate_noise

    def generate_noise(std, reference, generator=None, secure_mode=False):
        secure_draws.append((secure_mode, generator))
        return real_noise(std, reference, generator=generator, secure_mode=secure_mode)

    for module in (opacus_optimizer, opacus_fast_optimizer):  # each imports the function by name
        monkeypatch.setattr(module, "_generate_noise", generate_noise)
    first = _run(tiny_root, tmp_path, "a", engine, "--secure-rng")
    assert stand_in_csprng == ["/dev/urandom"]
    assert secure_draws and all(secure and generator is not None for secure, generator in secure_draws)
    second = _run(tiny_root, tmp_path, "b", engine, "--secure-rng")
    assert any(not torch.equal(first[k], second[k]) for k in first), "the seed must not determine secure runs"
    assert json.loads((tmp_path / "a" / "config.json").read_text())["privacy"]["secure_rng"] is True


@pytest.mark.slow
def test_seeded_runs_do_not_use_secure_mode(tiny_root, tmp_path):
    assert all(torch.equal(a, b) for a, b in zip(_run(tiny_root, tmp_path, "a", "bk", "--seed", 5).values(),
                                                 _run(tiny_root, tmp_path, "b", "bk", "--seed", 5).values()))


def test_secure_rng_without_torchcsprng_is_refused(tiny_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "torchcsprng", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchcsprng" else real_find_spec(name, *a))
    code = vision.main([str(a) for a in ["--dataset", "mnist", "--data-root", tiny_root, "--out", tmp_path / "out",
                                         "--train-subset", 64, "--batch-size", 16, "--noise", 1, "--secure-rng",
                                         "--wandb", "disabled"]])
    err = capsys.readouterr().err
    assert code == 2 and "needs the torchcsprng package" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
