"""PGD and FGSM-RS: the threat model is respected, the attack is the standard one, it is strong on a trained
model, robust training helps, and attacking never touches training state or mixes examples."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks.adversarial import AdversarialBatches
from attacks.isolation import attack_view
from attacks.pgd import AttackSpec, perturb
from attacks.robust_eval import masking_checks, robust_accuracy
from dp_layers import refresh_public_statistics
from src import cifar10, mnist
from src.accounting import plan_privacy
from src.config import ENGINES, ModelConfig, build_config
from src.data import ImageTensorDataset
from src.models.lenet import LeNet5
from src.privacy import attach
from tests.conftest import class_patterns

CPU = torch.device("cpu")


# The tests' own input scaling, fixed here so that the synthetic task stays one a clean model is not robust on
# at radius 0.1 (the product's models scale by 0.5/0.5, public constants; with those, a cleanly trained
# model on these high-contrast patterns already resists 0.1, and PGD's strength could not be told apart).
TEST_MEAN, TEST_STD = (0.1307,), (0.3081,)


def lenet(norm="none", seed=0):
    torch.manual_seed(seed)
    return LeNet5(norm=norm, act="tanh", mean=TEST_MEAN, std=TEST_STD)


def patterns(n, seed):
    labels = np.random.default_rng(seed).integers(0, 10, n)
    images = class_patterns(labels, 28, 28, 1, seed)[..., 0]
    return torch.tensor(images).unsqueeze(1).float() / 255, torch.tensor(labels)


def as_dataset(images, labels):
    return ImageTensorDataset((images * 255).round().to(torch.uint8), labels)


def train(model, images, labels, *, steps, adversarial=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (64,), generator=generator)
        x, y = images[idx], labels[idx]
        if adversarial is not None:
            x = adversarial(model, x, y)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """A LeNet-5 trained cleanly to 100% on the synthetic patterns, and its test set."""
    x_train, y_train = patterns(512, 1)
    x_test, y_test = patterns(256, 2)
    model = train(lenet(), x_train, y_train, steps=120)
    with torch.no_grad():
        assert (model(x_test).argmax(1) == y_test).float().mean() > 0.95
    return model, (x_train, y_train), (x_test, y_test)


SPECS = [AttackSpec("pgd", "linf", 0.1, 0.02, 5, 2), AttackSpec("pgd", "l2", 1.5, 0.5, 5, 2),
         AttackSpec("fgsm-rs", "linf", 0.1, 0.125, 1, 1), AttackSpec("pgd", "linf", 0.3, 0.1, 3, 1, False)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_perturbations_stay_in_the_ball_and_in_pixel_range(spec):
    model = lenet().eval()
    torch.manual_seed(1)
    images = torch.rand(16, 1, 28, 28)
    images[:4] = 0.0  # at the edges of the pixel range, the clamp and the projection both bind
    images[4:8] = 1.0
    adversarial = perturb(model, images, torch.randint(0, 10, (16,)), spec, generator=torch.Generator().manual_seed(0))
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    delta = (adversarial - images).flatten(1)
    if spec.norm == "linf":
        assert delta.abs().max() <= spec.eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= spec.eps * (1 + 1e-5)).all()
    assert delta.abs().max() > 0  # it did move


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_without_random_start_matches_torchattacks(norm):
    torchattacks = pytest.importorskip("torchattacks")
    model = lenet().eval()
    torch.manual_seed(2)
    images, labels = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))  # 8: the 1/B of the mean loss is exact
    if norm == "linf":
        reference = torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=10, random_start=False)
        spec = AttackSpec("pgd", "linf", 0.1, 0.01, 10, 1, random_start=False)
    else:
        reference = torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=False)
        spec = AttackSpec("pgd", "l2", 1.0, 0.2, 10, 1, random_start=False)
    ours = perturb(model, images, labels, spec)
    theirs = reference(images, labels)
    if norm == "linf":
        assert torch.equal(ours, theirs)
    else:  # our loss is the sum, theirs the mean: the normalised step agrees to rounding
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(ours, images)


def test_pgd_hurts_far_more_than_random_noise_of_the_same_size(trained):
    model, _, (x_test, y_test) = trained
    spec = AttackSpec("pgd", "linf", 0.1, 0.025, 10, 1)
    dataset = as_dataset(x_test, y_test)
    attacked = robust_accuracy(model, dataset, spec, size=256, batch_size=128, device=CPU)
    corners = (torch.randint(0, 2, x_test.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * spec.eps
    with torch.no_grad():
        clean = 100 * (model(dataset.__getitems__(range(256))[0]).argmax(1) == y_test).float().mean().item()
        noisy = 100 * (model((x_test + corners).clamp(0, 1)).argmax(1) == y_test).float().mean().item()
    assert noisy >= clean - 5, "random sign noise at the full radius should barely matter"
    assert attacked <= 20 and attacked <= noisy - 70


@pytest.mark.slow
def test_robust_training_raises_robust_accuracy(trained):
    clean_model, (x_train, y_train), (x_test, y_test) = trained
    spec = AttackSpec("pgd", "linf", 0.1, 0.05, 3, 1)
    robust_model = train(lenet(), x_train, y_train, steps=120,
                         adversarial=AdversarialBatches(spec, 1.0, torch.Generator().manual_seed(3)))
    evaluation = AttackSpec("pgd", "linf", 0.1, 0.0125, 20, 1)
    dataset = as_dataset(x_test, y_test)
    clean_trained = robust_accuracy(clean_model, dataset, evaluation, size=256, batch_size=256, device=CPU)
    robust_trained = robust_accuracy(robust_model, dataset, evaluation, size=256, batch_size=256, device=CPU)
    assert robust_trained >= clean_trained + 50, (clean_trained, robust_trained)


@pytest.mark.slow
def test_masking_checks_pass_on_a_real_model_and_catch_a_masked_one(trained):
    model, _, (x_test, y_test) = trained
    dataset = as_dataset(x_test, y_test)
    spec = AttackSpec("pgd", "linf", 0.1, 0.025, 10, 1)
    report = masking_checks(model, dataset, spec, size=128, batch_size=128, device=CPU, source=lenet(seed=5))
    assert report["falls_towards_zero"] and report["stronger_attacks_never_raise"]

    class Quantised(torch.nn.Module):
        """The same classifier behind a rounding of its input: gradients vanish, robustness does not appear."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.round(x * 8) / 8)

    masked = Quantised(model)
    source = train(lenet(seed=7), *patterns(512, 1), steps=120)  # an independently trained model to transfer from
    report = masking_checks(masked, dataset, spec, size=128, batch_size=128, device=CPU, source=source)
    assert not report["passed"]
    assert not report["white_box_beats_transfer"] or not report["falls_towards_zero"]


def engine_training(engine: str, norm: str):
    flags = {"dataset": "mnist", "engine": engine, "norm": norm, "batch_size": 16, "physical_batch_size": 16,
             "lr": 0.1, "clip": 1.0, "epochs": 1, "momentum": 0.9}
    if engine != "non-private":
        flags["noise"] = 1.0
    config = build_config(flags, mnist.DEFAULTS)
    images, labels = patterns(64, 3)
    data = as_dataset(images, labels)
    model = lenet(norm)
    if norm == "bn-public":
        refresh_public_statistics(model, torch.rand(32, 1, 28, 28))
    training = attach(model, data, config, plan_privacy(config, len(data)),
                      sampling_generator=torch.Generator().manual_seed(0),
                      noise_generator=torch.Generator().manual_seed(1) if engine != "non-private" else None)
    return training, images[:16], labels[:16]


def training_state(training) -> dict:
    """Everything an attack must leave alone: gradients, per-sample state, buffers, optimizer, accountant."""
    state = {}
    for name, p in training.base_model.named_parameters():
        for attr in ("grad", "grad_sample", "_norm_sample", "_current_grad_sample", "summed_grad"):
            value = getattr(p, attr, None)
            state[f"{name}.{attr}"] = None if value is None else value.detach().clone()
        state[f"{name}.requires_grad"] = p.requires_grad
        state[f"{name}.value"] = p.detach().clone()
    for name, b in training.base_model.named_buffers():
        state[f"buffer {name}"] = b.clone()
    for name, module in training.base_model.named_modules():
        if hasattr(module, "activations"):
            state[f"{name}.activations"] = len(module.activations)
    state["bk records"] = len(getattr(training.model, "_records", []))
    state["hooks"] = getattr(training.model, "hooks_enabled", None)
    state["history"] = training.history()
    state["optimizer"] = repr(training.optimizer.state_dict())
    return state


def assert_same(before: dict, after: dict):
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and torch.equal(a, b), key
        else:
            assert a == b, key


@pytest.mark.parametrize("engine", ENGINES)
def test_attacks_never_touch_training_state(engine):
    training, images, labels = engine_training(engine, "bn-public")
    # Mid-step: a physical batch has been through forward and backward, so gradient state exists.
    training.optimizer.zero_grad()
    training.criterion(training.model(images), labels).backward()
    before = training_state(training)
    attack = AdversarialBatches(AttackSpec("pgd", "linf", 0.1, 0.03, 3, 2), 1.0, torch.Generator().manual_seed(0))
    adversarial = attack(training.model, images, labels)
    assert not torch.equal(adversarial, images)
    assert_same(before, training_state(training))
    # And the step still works after the attack.
    training.optimizer.step()


@pytest.mark.parametrize("engine", ["hooks", "bk", "non-private"])
@pytest.mark.parametrize("norm", ["bn-public", "group", "none"])
def test_adversarial_example_depends_only_on_its_own_example(engine, norm):
    training, images, labels = engine_training(engine, norm)
    spec = AttackSpec("pgd", "linf", 0.1, 0.03, 4, 1)
    start = (torch.rand(images.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1) * spec.eps
    with attack_view(training.model) as plain:
        reference = perturb(plain, images, labels, spec, start=start)
    others = images.clone()
    others[1:] = torch.rand(len(images) - 1, 1, 28, 28)
    other_labels = labels.clone()
    other_labels[1:] = torch.randint(0, 10, (len(images) - 1,))
    order = torch.cat([torch.tensor([0]), 1 + torch.randperm(len(images) - 1)])
    with attack_view(training.model) as plain:
        changed = perturb(plain, others[order], other_labels[order], spec, start=start[order])
    assert torch.equal(changed[0], reference[0])
    assert not torch.equal(changed[1:], reference[1:])


def test_adv_ratio_zero_and_empty_batches_are_left_alone():
    model = lenet()
    images, labels = patterns(8, 4)
    spec = AttackSpec("pgd", "linf", 0.1, 0.03, 2, 1)
    assert torch.equal(AdversarialBatches(spec, 0.0)(model, images, labels), images)
    assert AdversarialBatches(spec, 1.0)(model, images[:0], labels[:0]).shape == (0, 1, 28, 28)
    half = AdversarialBatches(spec, 0.5, torch.Generator().manual_seed(0))(model, images, labels)
    changed = (half != images).flatten(1).any(dim=1)
    assert 0 < changed.sum() < len(images)


def test_resnet_attack_keeps_group_norm_model_in_its_mode():
    torch.manual_seed(0)
    model = cifar10.DATASET.build_model(ModelConfig(norm="group", act="relu")).train()
    images, labels = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    adversarial = AdversarialBatches(AttackSpec("pgd", "linf", 8 / 255, 2 / 255, 2, 1), 1.0)(model, images, labels)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert (adversarial - images).abs().max() <= 8 / 255 + 1e-6
