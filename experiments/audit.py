"""Empirical privacy audit: a lower bound on epsilon from one real training run (Steinke, Nasr and
Jagielski 2023, "Privacy auditing with one (1) training run").

    python -m experiments.audit --data-root data [--engine bk] [--norm bn-public] [--robust] [--canaries 1000]
    python -m experiments.audit --data-root data --model scatternet-linear --norm bn-dp

m canaries (held-out MNIST training images given a wrong label) are each inserted into the private
training set with probability 1/2, the model is trained with the ordinary ``vision.py`` code path (same
engines, same accountant), and the auditor guesses membership from each canary's loss on the final model:
the k lowest losses "in", the k highest "out". If the training were (eps, delta)-DP, the number of correct
guesses would be dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 3);
the largest eps that this count rejects at the chosen confidence is the empirical lower bound. Several
guess counts are tried with a Bonferroni correction, so the reported bound holds at the stated
confidence. A lower bound above the accountant's epsilon means the privacy claim is false.

The theorem needs one fixed mechanism whatever the canaries' coin flips, so the Poisson schedule (sample
rate, steps, expected batch) and the noise are fixed before the canaries are drawn, from the expected
training-set size (the private images plus half the canaries); the run samples at that rate whatever number
of canaries went in, instead of reading the rate off the size of the set it was given.

``--white-box`` audits with gradient canaries instead (``experiments.gradient_canaries``): m Dirac canaries,
each inserted with probability 1/2, enter every step they are sampled in through the engine's own clipping and
noise, and the auditor scores them from all the noised gradients, which can bring the bound close to epsilon.

``--broken half-noise`` runs with half the claimed noise. ``--broken no-clipping`` (for the tests) trains without
clipping while adding the noise of the claimed
configuration, and audits against the claimed epsilon: the audit must catch it. Catching it takes a run
that memorises the inserted canaries, since the audit only sees what the final model leaks; the SGD
settings tuned for DP training do not reliably do that without clipping (they either generalise past the
wrong labels or diverge), so the tests train it with Adam on small batches (``--optimizer adam
--batch-size 25``), which memorises them. Neither choice loosens the claim: the optimizer only
post-processes the noised gradients, and the claimed noise is calibrated for the batch size's sample rate
and step count, so the claimed epsilon stays the same (``--target-epsilon``); the real engines, run with
the same settings, stay below it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from src.engines import PRIVATE_ENGINES
from src.errors import UserError

GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.5)  # total guesses r as a fraction of m, half "in" and half "out"
BROKEN_VARIANTS = ("no-clipping", "half-noise")
UNCLIPPED = 1e6  # a clipping bound no gradient reaches


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (epsilon, delta)-DP training run with m canaries
    (Steinke et al. 2023, Theorem 3 and its delta term)."""
    q = 1 / (1 + math.exp(-epsilon))
    tail = stats.binom.sf(v - 1, r, q)
    if v < 1:
        return min(1.0, tail)
    # alpha = max over i = 1..v of (sum of pmf(v - j) for j = 1..i) / i, in one vectorised pass
    window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest epsilon rejected at ``significance``: the run is not (epsilon, delta)-DP for any
    smaller epsilon, with confidence 1 - significance (0 when nothing is rejected)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


@dataclass
class Guesses:
    guesses: int
    correct: int
    epsilon_lower_bound: float


def audit_guesses(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float) -> list:
    """For each guess count: the top-scored half 'in', the bottom half 'out', the correct count and the
    bound at the Bonferroni-corrected level (so the best of them holds at ``confidence``)."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # most member-like first
    significance = (1 - confidence) / len(GUESS_FRACTIONS)
    results = []
    for fraction in GUESS_FRACTIONS:
        k = max(1, int(fraction * m) // 2)
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        results.append(Guesses(2 * k, correct, epsilon_lower_bound(m, 2 * k, correct, delta, significance)))
    return results


@dataclass(frozen=True)
class Canaries:
    """Held-out training images ``[start, start + m)``, each given a wrong label (its true label plus a
    nonzero ``shift``, mod 10), and who is inserted: drawn before any data is read, so n is known up front."""

    start: int
    shift: torch.Tensor
    included: torch.Tensor  # bool, the secret the auditor guesses

    @classmethod
    def draw(cls, start: int, m: int, seed: int) -> "Canaries":
        generator = torch.Generator().manual_seed(seed)
        shift = torch.randint(1, 10, (m,), generator=generator)
        return cls(start=start, shift=shift, included=torch.rand(m, generator=generator) < 0.5)

    @property
    def m(self) -> int:
        return len(self.shift)

    def labels(self, true_labels: torch.Tensor) -> torch.Tensor:
        return (true_labels[self.start:self.start + self.m] + self.shift) % 10


def schedule_size(private: int, m: int) -> int:
    """The n the audit's Poisson schedule is planned from: fixed before the coin flips (module doc)."""
    return private + m // 2


def with_canaries(spec, canaries: Canaries, drawn: dict):
    """The dataset spec whose private training set is the first ``canaries.start`` images plus the
    inserted canaries, sampled on the schedule of ``schedule_size`` (not of the inserted count); the
    canary images and labels go to ``drawn``."""
    from src.data import ImageTensorDataset, LoadedData

    def load(data_config, with_public: bool):
        full = spec.load(dataclasses.replace(data_config, train_subset=None), with_public)
        images, labels = full.train.images, full.train.labels
        private, m = canaries.start, canaries.m
        if len(images) < private + m:
            raise UserError(f"the audit needs {private + m} training images ({private} private, {m} "
                            f"canaries); the data set has {len(images)}")
        canary_images, canary_labels = images[private:private + m], canaries.labels(labels)
        train = ImageTensorDataset(torch.cat([images[:private], canary_images[canaries.included]]),
                                   torch.cat([labels[:private], canary_labels[canaries.included]]))
        drawn.update(images=canary_images, labels=canary_labels)
        return LoadedData(train=train, test=full.test, public=full.public,
                          notes=full.notes + [f"audit: {int(canaries.included.sum())} of {m} canaries inserted"],
                          schedule_size=schedule_size(private, m))

    return dataclasses.replace(spec, load=load)


@torch.no_grad()
def canary_scores(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Minus each canary's loss under its (wrong) label: memorised canaries score high."""
    model.eval()
    losses = [F.cross_entropy(model(images[i:i + 500].float() / 255), labels[i:i + 500], reduction="none")
              for i in range(0, len(images), 500)]
    return -torch.cat(losses).numpy()


def _claimed_noise(args, n: int) -> tuple:
    """(noise multiplier, epsilon) the configuration claims for n private examples: with --norm bn-dp, the
    epsilon of its statistics and DP-SGD together, and DP-SGD's noise calibrated to what the statistics leave."""
    from src.accounting import calibrate_noise, epsilon_from_history, poisson_schedule

    schedule = poisson_schedule(n, args.batch_size)
    steps = schedule.steps_per_epoch * args.epochs
    prelude = _prelude(args)
    noise = args.noise or calibrate_noise(target_epsilon=args.target_epsilon, delta=args.delta,
                                          sample_rate=schedule.sample_rate, steps=steps, accountant="rdp",
                                          prelude=prelude)
    return noise, epsilon_from_history("rdp", prelude + [(noise, schedule.sample_rate, steps)], args.delta)


def _prelude(args) -> list:
    """What the audited run releases before training (src.accounting.prelude_of, from the audit's flags)."""
    from dp_layers.dp_bn import accountant_entry

    return [accountant_entry(args.norm_noise)] if args.norm == "bn-dp" else []


def _momentum(args) -> float:
    """--momentum, or its default: 0.9 for sgd and rmsprop, none for adam (whose betas play that role)."""
    if args.momentum is not None:
        return args.momentum
    return 0.0 if args.optimizer == "adam" else 0.9


def white_box_spec(spec, canaries: Canaries):
    """The dataset spec of a white-box audit: the model with the canaries' inert probe layer, the first
    ``canaries.start`` images as the private set, sampled on the schedule of ``schedule_size`` (the canaries
    are examples of the training set, inserted as gradients)."""
    from experiments.gradient_canaries import CanaryProbe

    def load(data_config, with_public: bool):
        full = spec.load(dataclasses.replace(data_config, train_subset=canaries.start), with_public)
        return dataclasses.replace(full, schedule_size=schedule_size(canaries.start, canaries.m),
                                   notes=full.notes + [f"white-box audit: {int(canaries.included.sum())} of "
                                                       f"{canaries.m} gradient canaries inserted"])

    return dataclasses.replace(spec, load=load,
                               build_model=lambda config: CanaryProbe(spec.build_model(config), canaries.m))


def run_audit(args) -> dict:
    from src.accounting import poisson_schedule
    from src.config import build_config
    from src.datasets import get_dataset
    from src.train import load_run_model, run

    spec = get_dataset("mnist")
    n = schedule_size(args.train_subset, args.canaries)
    noise, claimed_epsilon = _claimed_noise(args, n)
    canaries = Canaries.draw(args.train_subset, args.canaries, args.seed)
    clip = args.clip
    if args.broken == "no-clipping":  # the claimed noise, but no per-sample bound behind it
        noise, clip = noise * clip / UNCLIPPED, UNCLIPPED
    elif args.broken == "half-noise":
        noise = noise / 2
    flags = {name: getattr(args, name) for name in AUDIT_DEFAULTS}
    if args.norm != "bn-dp":
        flags.update(norm_clip=None, norm_noise=None)  # bn-dp's own settings, refused with any other norm
    flags.update(dataset="mnist", momentum=_momentum(args), clip=clip, noise=noise, target_epsilon=None,
                 eval_robust_size=0, wandb="disabled", download=False)
    if args.robust:
        flags.update(robust=True, attack="fgsm-rs")
    else:
        flags["robust"] = None
    config = build_config(flags, spec.defaults)
    drawn: dict = {}
    hooks = None
    if args.white_box:
        from experiments.gradient_canaries import GradientCanaries

        schedule = poisson_schedule(n, args.batch_size)
        claimed_noise = _claimed_noise(args, n)[0]  # the auditor scores against the claim, whatever ran
        hooks = GradientCanaries(canaries.included, sample_rate=schedule.sample_rate, clip=args.clip,
                                 noise=claimed_noise, expected_batch_size=schedule.expected_batch_size,
                                 seed=args.seed + 1)
        summary = run(config, white_box_spec(spec, canaries), hooks=hooks)
    else:
        summary = run(config, with_canaries(spec, canaries, drawn))
    if summary.status != "finished":
        raise UserError(f"the audited run did not finish: {summary.status} ({summary.reason})")
    run_dir = Path(config.output.out) / summary.run_id
    if args.white_box:
        scores = hooks.scores()
    else:
        model = load_run_model(str(run_dir), spec, torch.device("cpu"))
        scores = canary_scores(model, drawn["images"], drawn["labels"])
    results = audit_guesses(scores, canaries.included.numpy(), delta=args.delta, confidence=args.confidence)
    best = max(results, key=lambda g: g.epsilon_lower_bound)
    report = {"white_box": args.white_box, "engine": args.engine, "norm": args.norm, "robust": args.robust,
              "broken": args.broken, "seconds": summary.wall_seconds,
              "optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
              "canaries": canaries.m, "inserted": int(canaries.included.sum()), "n_train": summary.n_train,
              "sample_rate": summary.sample_rate,
              "confidence": args.confidence, "delta": args.delta, "accountant": "rdp",
              "claimed_epsilon": claimed_epsilon, "epsilon_lower_bound": best.epsilon_lower_bound,
              "guesses": [dataclasses.asdict(g) for g in results], "test_acc": summary.test_acc,
              "run_dir": str(run_dir)}
    (run_dir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# The vision.py settings the audit takes (declared once, in src.config), with the audit's own defaults: a small
# MNIST run whose claimed epsilon is 1. ``momentum`` None: 0.9 for sgd and rmsprop, none for adam.
AUDIT_DEFAULTS = {"data_root": "data", "engine": "bk", "model": None, "norm": "none", "norm_clip": None,
                  "norm_noise": 8.0, "public_data": None, "public_size": None,
                  "robust": False, "train_subset": 1000, "test_subset": 2000, "epochs": 30, "batch_size": 250,
                  "optimizer": "sgd", "lr": 0.5, "momentum": None, "clip": 0.1, "delta": 1e-5, "seed": 0,
                  "out": "runs/audit", "run_id": None}
SHOWN_DEFAULTS = {"momentum": "0.9 for sgd and rmsprop, none for adam", "public_data": "KMNIST under --data-root",
                  "model": "lenet5", "norm_clip": "the model's",
                  "train_subset": "1000 private images besides the canaries", "public_size": "128",
                  "run_id": "generated"}


def build_parser() -> argparse.ArgumentParser:
    from src.cli import add_setting, readable
    from src.config import SETTINGS

    parser = argparse.ArgumentParser(prog="python -m experiments.audit", description=__doc__.split("\n\n")[0])
    for name, default in AUDIT_DEFAULTS.items():
        add_setting(parser, SETTINGS[name], default=default, choices=PRIVATE_ENGINES if name == "engine" else None,
                    help_default=SHOWN_DEFAULTS.get(name, readable(default)))
    noise = parser.add_mutually_exclusive_group()  # the claim: calibrated for an epsilon, or a given noise
    add_setting(noise, SETTINGS["target_epsilon"], default=1.0, help_default="1 (rdp)")
    add_setting(noise, SETTINGS["noise"], help_default="calibrated for --target-epsilon")
    parser.add_argument("--canaries", type=int, default=1000, help="m, each inserted with probability 1/2")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--broken", choices=BROKEN_VARIANTS, help="a deliberately non-private variant (tests)")
    parser.add_argument("--white-box", action="store_true",
                        help="gradient canaries scored from every noised gradient (experiments.gradient_canaries); "
                             "its defaults: 50000 canaries, 5 epochs, one full batch per epoch")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


# --white-box: canaries are coordinates of an inert layer (no images), so many are cheap, and the tightest audit is
# of few full-batch steps: every inserted canary is in every step, and the scores see a plain Gaussian mechanism.
WHITE_BOX_DEFAULTS = {"canaries": 50000, "epochs": 5, "batch_size": None}  # batch None: all n (sample rate 1)


def _white_box_defaults(args, argv: list) -> None:
    """The white-box defaults for the flags the command line leaves unset."""
    given = {token.split("=")[0] for token in argv if token.startswith("--")}
    for name, value in WHITE_BOX_DEFAULTS.items():
        if "--" + name.replace("_", "-") not in given:
            setattr(args, name, value)
    if args.batch_size is None:
        args.batch_size = schedule_size(args.train_subset, args.canaries)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.white_box:
        _white_box_defaults(args, argv)
    try:
        if args.canaries < 10 or args.train_subset < 1:
            raise UserError("--canaries must be at least 10 and --train-subset at least 1")
        report = run_audit(args)
    except UserError as error:
        print(f"experiments.audit: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        best = max(report["guesses"], key=lambda g: g["epsilon_lower_bound"])
        variant = f", BROKEN: {report['broken']}" if report["broken"] else ""
        kind = "white-box audit" if report["white_box"] else "audit"
        print(f"{kind} ({report['engine']}, norm {report['norm']}{', robust' if report['robust'] else ''}{variant}): "
              f"empirical epsilon >= {report['epsilon_lower_bound']:.3f} at {100 * report['confidence']:g}% "
              f"confidence ({best['correct']}/{best['guesses']} guesses right, {report['canaries']} canaries) vs "
              f"accountant epsilon {report['claimed_epsilon']:.3f} (rdp, delta {report['delta']:g}); "
              f"{report['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
