"""One frozen configuration per run: the single source of truth, saved as config.json and logged to wandb.

Flags the user leaves unset take the dataset's defaults (declared in its module in ``src/``), then the
global defaults below. Validation here covers everything that does not need the data; checks that
need the training-set size (delta < 1/n, calibration) live in ``src.privacy.plan_privacy``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Optional

from attacks.defaults import ATTACKS, ENSEMBLES, EVAL_ATTACKS, PGD_NORMS, default_alpha
from dp_layers.norms import NORM_KINDS
from src.engines import BK_KEEP_POLICIES, ENGINE_NAMES
from src.errors import UserError
from src.models import model_defaults, model_names  # the registry: a new family file is a new choice
from src.settings import section_settings, setting

ENGINES = ENGINE_NAMES  # src.engines: one record per engine
# Every accountant a run reports. Only the rigorous ones (upper bounds on epsilon) may calibrate the noise,
# guard the budget and give the run's headline epsilon; GDP is a central-limit approximation that can
# understate epsilon (a GDP target of 3 on MNIST gives noise 1.04, whose PRV lower bound is 3.13), so it is
# only reported beside them, labelled as an approximation.
ACCOUNTANTS = ("rdp", "prv", "gdp")
RIGOROUS_ACCOUNTANTS = ("rdp", "prv")
NORMS = tuple(NORM_KINDS)  # dp_layers.norms: the normalization registry
ACTIVATIONS = ("tanh", "relu")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
WANDB_MODES = ("offline", "online", "disabled")
PRECISIONS = ("fp32", "bf16")
# Engines whose per-sample norms and clipped sums stay float32 under bf16 autocast: bk upcasts each layer's input
# and output gradient before its book-keeping; Opacus's engines form per-sample gradients in the activations' dtype.
BF16_ENGINES = ("bk", "non-private")
# Opacus 1.6's unfold2d (its Conv2d grad sampler) builds the unfolded view with strides of a contiguous NCHW
# tensor, so a channels-last input gives wrong per-sample gradients (tests/test_precision.py shows it).
CHANNELS_LAST_REFUSED = ("hooks", "ghost")
DEVICES = ("auto", "cpu", "cuda")
DATA_ROOT_ENV = "PRV_DATA_ROOT"
# Flags that only mean something for --robust training (the radius and norm also set the evaluation attack).
ROBUST_TRAINING_FLAGS = ("attack", "pgd_alpha", "pgd_steps", "pgd_restarts", "adv_ratio")
# Flags that only mean something for --norm bn-dp (dp_layers.dp_bn).
BN_DP_FLAGS = ("norm_clip", "norm_noise")


def _dataset_names() -> tuple:
    from src.datasets import DATASETS  # the registry: a new dataset module is a new choice

    return tuple(DATASETS)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _radius(text: str):
    """A number, a fraction as radii are written (``8/255``), or a dataset's named radius (resolved with the
    dataset's defaults)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        if text.replace("-", "").isalpha():
            return text
        raise argparse.ArgumentTypeError(f"expected a number or a radius name, got {text!r}") from None


def _accountant(text: str) -> str:
    if text not in RIGOROUS_ACCOUNTANTS:
        raise argparse.ArgumentTypeError(accountant_refusal(text))
    return text


PARSERS = {int: _integer, float: _number, str: str}  # argparse types by field type (bool fields are switches)

# Every setting, declared once (src.settings): its type, its default (none where each dataset module declares
# one), its help. The sections group them as config.json, wandb's config and --help do.


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = setting(choices=_dataset_names, help="mnist: LeNet-5 on 28x28 grey images; cifar10: ResNet-18 "
                                                        "(3x3 stem, no max-pool) on 32x32 colour. Required, "
                                                        "except with --resume and --eval-only (the run's own)")
    data_root: str = setting("./data", resumable=True, metavar="DIR", default_text=f"${DATA_ROOT_ENV} or ./data",
                             help="torchvision data folder")
    download: bool = setting(True, help="download missing data sets when the network allows")
    train_subset: Optional[int] = setting(None, metavar="N",
                                          help="train on the first N private examples; the accountant uses this N")
    test_subset: Optional[int] = setting(None, metavar="N", help="evaluate on the first N test images")
    public_data: Optional[str] = setting(None, metavar="FILE.npz[:KEY]",
                                         help="public images (uint8 array in an .npz or .npy) instead of the "
                                              "dataset's default source (KMNIST train for mnist, CIFAR-100 train "
                                              "for cifar10); more images than the file holds is an error")
    public_size: int = setting(128, metavar="N", help="number of public images")
    public_holdout: bool = setting(False, help="cifar10: take the public set from the end of the CIFAR-10 "
                                               "training set and remove it from the private set (and from n)")
    val_size: int = setting(0, metavar="N",
                            help="hold out the last N private training images as a validation set (removed from "
                                 "n); tune on val_acc, never on the test set")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    model: Optional[str] = setting(None, choices=model_names, default_text="the dataset's: lenet5 for mnist, "
                                                                            "resnet18 for cifar10",
                                   help="the model family (src/models; docs/models.md); a family's own defaults "
                                        "(batch, learning rate, epochs, clipping) replace the dataset's")
    norm: str = setting("none", choices=NORMS, help="normalization layer after every convolution; bn-public is "
                                            "BatchNorm with statistics from the public set; bn-dp (scatternet "
                                            "models) estimates them once from the private set under DP, paid for "
                                            "out of epsilon (docs/models.md)")
    act: str = setting("tanh", choices=ACTIVATIONS, help="activation function")
    norm_groups: Optional[int] = setting(None, metavar="G", default_text="27 for the scatternet models",
                                         help="--norm group on the scattering features: the number of groups "
                                              "(it must divide the 81 or 243 channels)")
    norm_clip: Optional[float] = setting(None, metavar="C", default_text="the model's: scatternet 0.5 (mnist), "
                                                                       "2 (cifar10)",
                                         help="--norm bn-dp: L2 bound on each example's per-channel means, and on "
                                              "its means of squares, of the features; fixed in advance, never a "
                                              "statistic of the data")
    norm_noise: float = setting(8.0, metavar="SIGMA",
                                help="--norm bn-dp: noise multiplier of the two released sums (standard deviation "
                                     "SIGMA x --norm-clip); paid once, before training, out of the run's epsilon")
    ws: bool = setting(False, help="weight-standardized convolutions (Qiao et al. 2019; with --norm group, the "
                                   "ResNet of De et al. 2022); every engine clips the raw weight's exact "
                                   "per-sample gradient")
    compile_scattering: bool = setting(False, help="scatternet models: run the scattering's gradient passes "
                                                   "(attacks, robust training) through torch.compile: 1.4-1.6x "
                                                   "on a CPU, after 5-7 minutes of compiling once per machine "
                                                   "(about 1 once cached; docs/models.md); --eval-only keeps "
                                                   "the trained run's or turns it on")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = setting(help="passes over the private set (in expectation, with Poisson sampling)")
    batch_size: int = setting(help="expected (logical) Poisson batch size")
    physical_batch_size: int = setting(help="largest batch put through the model at once (Opacus "
                                            "BatchMemoryManager); capped at --batch-size")
    optimizer: str = setting("sgd", choices=OPTIMIZERS, help="applied to the noised gradient")
    lr: float = setting(help="learning rate")
    momentum: float = setting(0.0, help="sgd and rmsprop momentum")
    seed: Optional[int] = setting(None, default_text="sampling and noise seeds from the OS, kept only in "
                                                     "checkpoint.pt",
                                  help="make the run reproducible; the DP guarantee then assumes the seed stays "
                                       "secret")
    device: str = setting("auto", choices=DEVICES, resumable=True, help="where to train")
    eval_batch_size: int = setting(1000, help="batch size of evaluation")
    public_refresh_every: int = setting(1, metavar="STEPS",
                                        help="--norm bn-public: recompute the public statistics every STEPS "
                                             "optimizer steps (1: before every step, as the weights change)")
    checkpoint_every: Optional[int] = setting(None, metavar="STEPS",
                                              help="also checkpoint every STEPS optimizer steps (every epoch end "
                                                   "always is)")
    # The recipe of De et al. 2022 ("Unlocking high-accuracy differentially private image classification
    # through scale"): augmentation, augmentation multiplicity, an average of the weights.
    precision: str = setting("fp32", choices=PRECISIONS,
                             help="bf16: forward and backward passes under bf16 autocast, with per-sample norms, "
                                  "clipping factors, clipped sums and noise in float32 (--engine bk or non-private)")
    channels_last: bool = setting(False, help="model and batches in channels-last (NHWC) memory format: faster "
                                             "convolutions on recent GPUs, especially with --precision bf16")
    augment: bool = setting(False, help="augment training batches on the training device: random crop of the "
                                        "reflect-padded image and horizontal flip (cifar10), small random shifts "
                                        "(mnist)")
    augmult: int = setting(1, metavar="K", help="augmentation multiplicity: each sampled example is seen in K "
                                                "augmented views and its gradient is their mean, clipped once "
                                                "(privacy accounting unchanged); --physical-batch-size counts "
                                                "examples, each K rows")
    mirror_views: bool = setting(False, help="scatternet models on cached features (cifar10): each example trains "
                                             "on two views, its image and the mirror image, whose features are "
                                             "cached too; its gradient is their mean, clipped once (as --augmult; "
                                             "privacy accounting unchanged)")
    ema: Optional[float] = setting(None, metavar="DECAY",
                                   help="also evaluate an exponential moving average of the weights with this decay "
                                        "(post-processing: free in privacy; 0 turns it off)")

    @property
    def views(self) -> int:
        """Rows per example in a training batch, whose gradients are averaged and clipped once: --augmult's K
        augmented views, or --mirror-views' two cached ones."""
        return 2 if self.mirror_views else self.augmult


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    engine: str = setting("bk", choices=ENGINES,  # bk: the fastest engine in benchmarks/engines.py
                          help="per-sample gradient engine: Opacus's hooks, functorch or ghost; mixed-ghost (ghost "
                               "clipping with norm rules for every layer); bk (book-keeping, one backward pass); "
                               "or non-private training")
    bk_keep: str = setting(BK_KEEP_POLICIES[0], choices=BK_KEEP_POLICIES,
                           help="--engine bk: what a layer that formed per-sample gradients for its norm keeps until "
                                "its clipped sum: the smaller of those and its input + output gradient (least "
                                "memory), per-sample (fastest), or factors (input + output gradient)")
    bk_layer_budget: Optional[float] = setting(None, metavar="MB",
                                               help="--engine bk: a layer whose kept state would exceed MB (one "
                                                    "physical batch) keeps only its norms, and a second backward "
                                                    "pass computes its clipped sum: less memory, more time")
    noise: Optional[float] = setting(None, metavar="SIGMA", help="noise multiplier (replaces the dataset's "
                                                                 "--target-epsilon)")
    target_epsilon: Optional[float] = setting(None, metavar="EPS",
                                              help="calibrate the noise so that epsilon after all epochs is at "
                                                   "most EPS")
    delta: float = setting(1e-5, help="delta of (epsilon, delta)-DP; must be below 1/n")
    clip: float = setting(help="per-sample gradient norm bound C")
    accountant: str = setting("rdp", parse=_accountant, metavar="{rdp,prv}",
                              help="the rigorous accountant that calibrates, guards and reports epsilon; GDP's "
                                   "approximation is reported beside it")
    max_epsilon: Optional[float] = setting(None, metavar="EPS",
                                           help="budget guard: stop cleanly before any step that would take "
                                                "epsilon above EPS (for --accountant)")
    secure_rng: bool = setting(False, help="Opacus secure mode: cryptographically secure sampling and noise "
                                           "(needs torchcsprng; runs are then not reproducible from --seed)")

    @property
    def private(self) -> bool:
        return self.engine != "non-private"


@dataclass(frozen=True, kw_only=True)
class RobustConfig:
    """--robust training attack (crafted against the current weights for every batch) and the stronger
    attack robust accuracy is evaluated with (same radius and norm, more steps, PGD always)."""

    robust: bool = setting(False, training_only=True,
                           help="train on adversarial batches crafted against the current weights, then clip and "
                                "noise")
    attack: str = setting("pgd", choices=ATTACKS, help="training attack (fgsm-rs is one step)")
    pgd_norm: str = setting("linf", choices=PGD_NORMS, help="threat model of training and evaluation")
    pgd_eps: float = setting(parse=_radius, metavar="EPS|NAME",
                             help="attack radius in [0,1] pixel units (a number, or a fraction: 2/255), or a name: "
                                  "study (the CS523 study's 0.03), literature (mnist 0.3, cifar10 8/255), "
                                  "dp-literature (mnist 0.1)")
    pgd_alpha: float = setting(None, default_text="2.5 eps/steps; fgsm-rs 1.25 eps", help="training attack step")
    pgd_steps: int = setting(help="training PGD steps")
    pgd_restarts: int = setting(1, help="training PGD random restarts (worst case kept)")
    adv_ratio: float = setting(1.0, help="fraction of each batch made adversarial")
    eval_attack: str = setting("pgd", choices=EVAL_ATTACKS,
                               help="robust evaluation attack at the same radius and norm: PGD (--eval-pgd-*), "
                                    "AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square, with the "
                                    "paper's 100 iterations), or apgd: its first two attacks only (a CPU's budget)")
    eval_pgd_steps: int = setting(40, help="robust evaluation PGD steps")
    eval_pgd_restarts: int = setting(1, help="robust evaluation restarts")
    eval_pgd_alpha: float = setting(None, default_text="2.5 eps/steps", help="robust evaluation step")
    eval_robust_size: int = setting(1000, metavar="N", help="test images for robust accuracy (0 turns it off)")
    eval_robust_every: int = setting(None, metavar="EPOCHS",
                                     default_text="1 with --robust, else after the last epoch only",
                                     help="robust accuracy every EPOCHS epochs and after the last")
    masking_checks: bool = setting(False, help="after training (or with --eval-only): radius sweep, more "
                                               "steps/restarts, and transfer, to expose gradient masking")
    transfer_from: Optional[str] = setting(None, metavar="RUN_DIR",
                                           help="also attack with adversarial examples crafted on this run's "
                                                "model (e.g. non-private)")

    def train_attack(self):
        from attacks.pgd import AttackSpec

        return AttackSpec(method=self.attack, norm=self.pgd_norm, eps=self.pgd_eps, alpha=self.pgd_alpha,
                          steps=1 if self.attack == "fgsm-rs" else self.pgd_steps, restarts=self.pgd_restarts)

    def eval_attack_spec(self):
        """The attack robust accuracy is measured with (``--eval-attack``)."""
        from attacks.pgd import AttackSpec

        if self.eval_attack in ENSEMBLES:
            return AttackSpec(method=self.eval_attack, norm=self.pgd_norm, eps=self.pgd_eps, alpha=0.0, steps=0,
                              restarts=1)
        return self.eval_pgd_spec()

    def eval_pgd_spec(self):
        """The evaluation PGD (the gradient-masking checks vary it, whatever ``--eval-attack`` is)."""
        from attacks.pgd import AttackSpec

        return AttackSpec(method="pgd", norm=self.pgd_norm, eps=self.pgd_eps, alpha=self.eval_pgd_alpha,
                          steps=self.eval_pgd_steps, restarts=self.eval_pgd_restarts)


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    out: str = setting("runs", metavar="DIR", help="folder for run directories")
    run_id: Optional[str] = setting(None, default_text="generated", help="name of the run directory")
    wandb: str = setting("offline", choices=WANDB_MODES, resumable=True, help="wandb mode (never prompts)")
    wandb_project: str = setting("private_robust_vision", help="wandb project")
    wandb_group: Optional[str] = setting(None, help="wandb group (sweeps set their name)")
    # Loss and accuracy on the private training batches are not covered by epsilon (one example's loss is
    # unbounded), so they are released only when asked, under names that say so.
    unprotected_train_stats: bool = setting(False, help="also release loss and accuracy on the private training "
                                                        "batches, named train_loss_unprotected/"
                                                        "train_acc_unprotected: NOT covered by epsilon")


@dataclass(frozen=True)
class Config:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    privacy: PrivacyConfig
    output: OutputConfig
    robust: RobustConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return cls(**{name: section(**d[name]) for name, section in SECTIONS.items()})


# Section name (as in config.json) -> class, in the order --help shows them, with help's group titles.
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "privacy": PrivacyConfig,
            "robust": RobustConfig, "output": OutputConfig}
SECTION_TITLES = {"data": "data", "model": "model", "train": "training", "privacy": "privacy",
                  "robust": "robustness (PGD adversarial training and robust evaluation)", "output": "output"}
SETTINGS = {s.name: s for name, section in SECTIONS.items() for s in section_settings(name, section)}
# Defaults shared by every dataset; a dataset module's DEFAULTS supply the rest and may override these.
GLOBAL_DEFAULTS: Mapping[str, Any] = {name: s.default for name, s in SETTINGS.items() if not s.per_dataset}


def resolve_settings(flags: Mapping[str, Any], dataset_defaults: Mapping[str, Any]) -> dict:
    """Flags the user set win; then the model's defaults (``src.models``); then the dataset's; then the global ones.

    The physical batch size, when not given, is capped at the logical one. Privacy is the exception to
    plain layering: ``--noise`` and ``--target-epsilon`` are one choice, so
    giving either replaces the dataset's default for the pair instead of being combined with it.
    """
    settings = dict(GLOBAL_DEFAULTS)
    settings.update(dataset_defaults)
    user = {k: v for k, v in flags.items() if v is not None}
    settings.update(model_defaults(user.get("dataset", ""), user.get("model") or settings.get("model")))
    if "noise" in user or "target_epsilon" in user or user.get("engine") == "non-private":
        settings["noise"] = None
        settings["target_epsilon"] = None
    unset = dict(settings)  # what each setting would be without the flags
    settings.update(user)
    if "physical_batch_size" not in user and isinstance(settings.get("batch_size"), int):
        # The dataset's physical batch is a memory bound: it only shrinks to fit a smaller logical batch.
        settings["physical_batch_size"] = min(settings["physical_batch_size"], settings["batch_size"])
    _resolve_attack(settings, user)
    # A value other than the one it would have anyway: a saved config.json (which holds every setting) rebuilds
    given = [f for f in BN_DP_FLAGS if f in user and user[f] != unset.get(f)]
    if given and settings.get("norm") != "bn-dp":
        raise UserError(f"--{given[0].replace('_', '-')} sets how --norm bn-dp estimates its statistics; it needs "
                        f"--norm bn-dp, not {settings.get('norm')}")
    return settings


def _resolve_attack(settings: dict, user: Mapping[str, Any]) -> None:
    """Named radii (``--pgd-eps study``), step sizes and the robust-evaluation schedule."""
    radius = settings.get("pgd_eps")
    if isinstance(radius, str):
        named = settings.get("pgd_radii", {})
        if radius not in named:
            raise UserError(f"unknown --pgd-eps {radius!r}: give a number or one of {', '.join(named)}")
        settings["pgd_eps"] = named[radius]
    if not settings.get("robust"):
        given = [f for f in ROBUST_TRAINING_FLAGS if f in user]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} sets the training attack and needs --robust "
                            "(robust evaluation takes --pgd-eps, --pgd-norm and the --eval-pgd-* flags)")
    numeric = all(isinstance(settings.get(k), (int, float)) for k in ("pgd_eps", "pgd_steps", "eval_pgd_steps"))
    if numeric:
        if settings.get("pgd_alpha") is None:
            settings["pgd_alpha"] = default_alpha(settings["attack"], settings["pgd_eps"], settings["pgd_steps"])
        if settings.get("eval_pgd_alpha") is None:
            settings["eval_pgd_alpha"] = default_alpha("pgd", settings["pgd_eps"], settings["eval_pgd_steps"])
    if settings.get("eval_robust_every") is None:
        settings["eval_robust_every"] = 1 if settings.get("robust") else settings.get("epochs")


def build_config(flags: Mapping[str, Any], dataset_defaults: Mapping[str, Any]) -> Config:
    """Resolve defaults and validate; raise UserError with a one-line message on the first problem."""
    s = resolve_settings(flags, dataset_defaults)
    missing = [setting.option for name, setting in SETTINGS.items() if name not in s]
    if missing:
        raise UserError(f"no value or default for {', '.join(missing)}")
    config = Config(**{name: section(**{f.name: s[f.name] for f in dataclasses.fields(section)})
                       for name, section in SECTIONS.items()})
    validate(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def accountant_refusal(name: str) -> str:
    if name == "gdp":
        return ("gdp is a central-limit approximation that can understate epsilon, so it cannot "
                "calibrate, guard or certify a run; use rdp or prv (every run reports GDP's value beside them, "
                "labelled as an approximation)")
    return f"unknown --accountant {name!r}; choose from {', '.join(RIGOROUS_ACCOUNTANTS)}"


def _check_choices(config: Config) -> None:
    """Argparse enforces the declared choices on the command line; this enforces them on a config.json read
    back for --resume (the dataset is checked by the registry itself)."""
    for name, declared in SETTINGS.items():
        choices = declared.choices()
        value = getattr(getattr(config, declared.section), name)
        if choices is not None and name != "dataset" and value is not None:  # None: the dataset's own choice
            _require(value in choices, f"unknown {declared.option} {value!r}; choose from {', '.join(choices)}")


def validate(config: Config) -> None:
    """Every check that needs no data. The messages name the flag so the fix is obvious."""
    _check_choices(config)
    d, t, p, o = config.data, config.train, config.privacy, config.output
    _require(t.epochs >= 1, f"--epochs must be at least 1, got {t.epochs}")
    _require(t.batch_size >= 1, f"--batch-size must be at least 1, got {t.batch_size}")
    _require(t.physical_batch_size >= 1, f"--physical-batch-size must be at least 1, got {t.physical_batch_size}")
    _require(t.physical_batch_size <= t.batch_size,
             f"--physical-batch-size {t.physical_batch_size} is larger than --batch-size {t.batch_size}: "
             "it bounds the memory of one forward/backward pass and cannot exceed the logical batch")
    _require(t.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {t.eval_batch_size}")
    _require(t.public_refresh_every >= 1, f"--public-refresh-every must be at least 1, got {t.public_refresh_every}")
    _require(t.checkpoint_every is None or t.checkpoint_every >= 1,
             f"--checkpoint-every must be at least 1, got {t.checkpoint_every}")
    _require(t.augmult >= 1, f"--augmult must be at least 1, got {t.augmult}")
    _require(t.augmult == 1 or t.augment, f"--augmult {t.augmult} averages augmented views: it needs --augment "
                                               "(or --augmult 1)")
    _require(not t.mirror_views or (not t.augment and t.augmult == 1 and not config.robust.robust),
             "--mirror-views takes both views from the feature cache: it cannot be combined with --augment, "
             "--augmult or --robust, which change the pixels")
    _require(t.views == 1 or p.engine != "ghost",
             "--engine ghost is stock Opacus, whose norm rules clip each view (--augmult, --mirror-views) on its "
             "own; use --engine mixed-ghost (ghost clipping with rules that group an example's views), bk, hooks "
             "or functorch")
    _require(t.precision == "fp32" or p.engine in BF16_ENGINES,
             f"--precision {t.precision} needs --engine bk or non-private: --engine {p.engine} (Opacus) forms "
             "per-sample gradients in the activations' dtype, so its norms and clipping would be bf16")
    _require(not t.channels_last or p.engine not in CHANNELS_LAST_REFUSED,
             f"--channels-last: --engine {p.engine} uses Opacus's convolution per-sample gradients, whose unfold2d "
             "reads a channels-last input's memory as NCHW (wrong gradients); use bk, mixed-ghost, functorch or "
             "non-private")
    _require(t.ema is None or 0 <= t.ema < 1, f"--ema must be in [0, 1) (0 turns it off), got {t.ema}")
    _require(t.lr > 0, f"--lr must be positive, got {t.lr}")
    _require(0 <= t.momentum < 1, f"--momentum must be in [0, 1), got {t.momentum}")
    _require(not (t.optimizer == "adam" and t.momentum != 0),
             "--momentum does not apply to --optimizer adam (its betas play that role); drop --momentum")
    _require(t.seed is None or t.seed >= 0, f"--seed must be non-negative, got {t.seed}")
    _require(d.train_subset is None or d.train_subset >= 1, f"--train-subset must be at least 1, got {d.train_subset}")
    _require(d.test_subset is None or d.test_subset >= 1, f"--test-subset must be at least 1, got {d.test_subset}")
    _require(d.val_size >= 0, f"--val-size must be non-negative, got {d.val_size}")
    _require(d.public_size >= 1, f"--public-size must be at least 1, got {d.public_size}")
    _require(not (d.public_holdout and d.public_data),
             "--public-holdout and --public-data both choose the public set; give one of them")
    _require(p.engine == "bk" or (p.bk_keep == BK_KEEP_POLICIES[0] and p.bk_layer_budget is None),
             f"--bk-keep and --bk-layer-budget choose what --engine bk keeps; --engine {p.engine} keeps no such state")
    _require(p.bk_layer_budget is None or p.bk_layer_budget >= 0,
             f"--bk-layer-budget must be non-negative (MB), got {p.bk_layer_budget}")
    _require(p.accountant in RIGOROUS_ACCOUNTANTS, f"--accountant: {accountant_refusal(p.accountant)}")
    _require(0 < p.delta < 1, f"--delta must be in (0, 1), got {p.delta}")
    _require(p.clip > 0, f"--clip must be positive, got {p.clip}")
    if config.model.norm == "bn-dp":
        m = config.model
        # None: a model without a bn-dp default, which src.models.check_model refuses with the reason
        _require(m.norm_clip is None or m.norm_clip > 0, f"--norm-clip must be positive, got {m.norm_clip}")
        _require(m.norm_noise > 0, f"--norm-noise must be positive, got {m.norm_noise} (without noise the "
                                   "statistics of the private set would be released as they are)")
    if p.private:
        _require(not (p.noise is not None and p.target_epsilon is not None),
                 "give either --noise or --target-epsilon, not both")
        _require(p.noise is not None or p.target_epsilon is not None,
                 "a private run needs --noise SIGMA or --target-epsilon EPS")
        _require(p.noise is None or p.noise > 0,
                 f"--noise must be positive for a private run, got {p.noise} "
                 "(noise 0 gives no privacy guarantee: use --engine non-private)")
        _require(p.target_epsilon is None or p.target_epsilon > 0,
                 f"--target-epsilon must be positive, got {p.target_epsilon}")
        _require(p.max_epsilon is None or p.max_epsilon > 0, f"--max-epsilon must be positive, got {p.max_epsilon}")
        if p.max_epsilon is not None and p.target_epsilon is not None:
            _require(p.target_epsilon <= p.max_epsilon, f"--target-epsilon {p.target_epsilon:g} is above "
                     f"--max-epsilon {p.max_epsilon:g}: calibrate for at most the budget")
    else:
        _require(p.noise is None and p.target_epsilon is None,
                 "--engine non-private adds no noise: drop --noise/--target-epsilon or pick a private engine")
        _require(p.max_epsilon is None, "--engine non-private spends no budget it could guard: drop --max-epsilon")
        _require(not p.secure_rng, "--secure-rng secures the noise of private training: it needs a private --engine")
    _require(o.run_id is None or (o.run_id.strip() and "/" not in o.run_id and o.run_id not in (".", "..")),
             f"--run-id must be a plain directory name, got {o.run_id!r}")
    _validate_robust(config.robust)


def _validate_robust(r: RobustConfig) -> None:
    _require(r.pgd_eps > 0, f"--pgd-eps must be positive, got {r.pgd_eps}")
    _require(r.pgd_norm != "linf" or r.pgd_eps <= 1,
             f"--pgd-eps {r.pgd_eps} is beyond the [0, 1] pixel range for an linf attack")
    _require(not (r.attack == "fgsm-rs" and r.pgd_norm != "linf"),
             "--attack fgsm-rs is an L-infinity attack; use --pgd-norm linf or --attack pgd")
    _require(r.pgd_alpha > 0, f"--pgd-alpha must be positive, got {r.pgd_alpha}")
    _require(r.pgd_steps >= 1, f"--pgd-steps must be at least 1, got {r.pgd_steps}")
    _require(r.pgd_restarts >= 1, f"--pgd-restarts must be at least 1, got {r.pgd_restarts}")
    _require(0 <= r.adv_ratio <= 1, f"--adv-ratio must be in [0, 1], got {r.adv_ratio}")
    _require(r.eval_pgd_steps >= 1, f"--eval-pgd-steps must be at least 1, got {r.eval_pgd_steps}")
    _require(r.eval_pgd_restarts >= 1, f"--eval-pgd-restarts must be at least 1, got {r.eval_pgd_restarts}")
    _require(r.eval_pgd_alpha > 0, f"--eval-pgd-alpha must be positive, got {r.eval_pgd_alpha}")
    _require(r.eval_robust_size >= 0, f"--eval-robust-size must be non-negative, got {r.eval_robust_size}")
    _require(r.eval_robust_every >= 1, f"--eval-robust-every must be at least 1, got {r.eval_robust_every}")
    _require(r.eval_robust_size > 0 or not (r.masking_checks or r.transfer_from),
             "--masking-checks and --transfer-from evaluate robustness: they need --eval-robust-size > 0")
