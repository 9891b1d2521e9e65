"""One frozen configuration per run: the single source of truth, saved as config.json and logged to wandb.

Flags the user leaves unset take the dataset's defaults (declared in its module in ``src/``), then the
global defaults below. Validation here covers everything that does not need the data; checks that
need the training-set size (delta < 1/n, calibration) live in ``src.privacy.plan_privacy``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from attacks.defaults import ATTACKS, PGD_NORMS, default_alpha
from src.engines import ENGINE_NAMES
from src.errors import UserError

ENGINES = ENGINE_NAMES  # src.engines: one record per engine
# Every accountant a run reports. Only the rigorous ones (upper bounds on epsilon) may calibrate the noise,
# guard the budget and give the run's headline epsilon; GDP is a central-limit approximation that can
# understate epsilon (a GDP target of 3 on MNIST gives noise 1.04, whose PRV lower bound is 3.13), so it is
# only reported beside them, labelled as an approximation.
ACCOUNTANTS = ("rdp", "prv", "gdp")
RIGOROUS_ACCOUNTANTS = ("rdp", "prv")
NORMS = ("none", "group", "layer", "instance", "bn-public")
ACTIVATIONS = ("tanh", "relu")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
DATA_ROOT_ENV = "PRV_DATA_ROOT"

# Defaults shared by every dataset; a dataset module's DEFAULTS override these.
GLOBAL_DEFAULTS: Mapping[str, Any] = {
    "data_root": "./data",
    "download": True,
    "train_subset": None,
    "test_subset": None,
    "val_size": 0,  # validation examples held out from the private set (and from n); tune on these
    "public_data": None,
    "public_size": 128,
    "public_holdout": False,
    "norm": "none",
    "act": "tanh",
    "optimizer": "sgd",
    "momentum": 0.0,
    "seed": None,  # None: sampling and noise seeds from the OS's entropy, kept only in the checkpoint
    "device": "auto",
    "eval_batch_size": 1000,
    "public_refresh_every": 1,
    "checkpoint_every": None,  # steps between mid-epoch checkpoints (every epoch end is always checkpointed)
    "engine": "bk",  # the fastest engine in benchmarks/engines.py (README results)
    "noise": None,
    "target_epsilon": None,
    "delta": 1e-5,
    "accountant": "rdp",
    "max_epsilon": None,
    "secure_rng": False,
    "out": "runs",
    "run_id": None,
    "wandb": "offline",
    "wandb_project": "private_robust_vision",
    "wandb_group": None,
    "unprotected_train_stats": False,  # release loss/accuracy on the private batches (not covered by epsilon)
    # robust training (--robust) and robust evaluation; datasets set the radius and the training steps
    "robust": False,
    "attack": "pgd",
    "pgd_norm": "linf",
    "pgd_alpha": None,  # resolved: default_alpha(attack, eps, steps)
    "pgd_restarts": 1,
    "adv_ratio": 1.0,
    "eval_pgd_steps": 40,
    "eval_pgd_restarts": 1,
    "eval_pgd_alpha": None,  # resolved: 2.5 eps / eval steps
    "eval_robust_size": 1000,
    "eval_robust_every": None,  # resolved: every epoch for --robust runs, else after the last epoch only
    "masking_checks": False,
    "transfer_from": None,
}
# Flags that only mean something for --robust training (the radius and norm also set the evaluation attack).
ROBUST_TRAINING_FLAGS = ("attack", "pgd_alpha", "pgd_steps", "pgd_restarts", "adv_ratio")


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    data_root: str
    download: bool
    train_subset: Optional[int]
    test_subset: Optional[int]
    public_data: Optional[str]
    public_size: int
    public_holdout: bool
    val_size: int = 0  # held out from the private training set, removed from n; metrics released like the test set's


@dataclass(frozen=True)
class ModelConfig:
    norm: str
    act: str


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    physical_batch_size: int
    optimizer: str
    lr: float
    momentum: float
    seed: Optional[int]  # None: drawn from the OS (the noise is then not replayable from anything released)
    device: str
    eval_batch_size: int
    public_refresh_every: int  # bn-public: recompute public statistics every this many optimizer steps
    checkpoint_every: Optional[int] = None  # also checkpoint every this many steps (None: epoch ends only)


@dataclass(frozen=True)
class PrivacyConfig:
    engine: str
    noise: Optional[float]
    target_epsilon: Optional[float]
    delta: float
    clip: float
    accountant: str
    max_epsilon: Optional[float] = None  # budget guard: never take a step that would exceed it
    secure_rng: bool = False  # Opacus secure mode: CSPRNG (torchcsprng) for sampling and noise

    @property
    def private(self) -> bool:
        return self.engine != "non-private"


@dataclass(frozen=True)
class RobustConfig:
    """--robust training attack (crafted against the current weights for every batch) and the stronger
    attack robust accuracy is evaluated with (same radius and norm, more steps, PGD always)."""

    robust: bool
    attack: str
    pgd_norm: str
    pgd_eps: float
    pgd_alpha: float
    pgd_steps: int
    pgd_restarts: int
    adv_ratio: float
    eval_pgd_steps: int
    eval_pgd_restarts: int
    eval_pgd_alpha: float
    eval_robust_size: int
    eval_robust_every: int
    masking_checks: bool
    transfer_from: Optional[str]

    def train_attack(self):
        from attacks.pgd import AttackSpec

        return AttackSpec(method=self.attack, norm=self.pgd_norm, eps=self.pgd_eps, alpha=self.pgd_alpha,
                          steps=1 if self.attack == "fgsm-rs" else self.pgd_steps, restarts=self.pgd_restarts)

    def eval_attack(self):
        from attacks.pgd import AttackSpec

        return AttackSpec(method="pgd", norm=self.pgd_norm, eps=self.pgd_eps, alpha=self.eval_pgd_alpha,
                          steps=self.eval_pgd_steps, restarts=self.eval_pgd_restarts)


@dataclass(frozen=True)
class OutputConfig:
    out: str
    run_id: Optional[str]
    wandb: str
    wandb_project: str
    wandb_group: Optional[str]
    # Loss and accuracy on the private training batches are not covered by epsilon (one example's loss is
    # unbounded), so they are released only when asked, under names that say so.
    unprotected_train_stats: bool = False


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
        return cls(
            data=DataConfig(**d["data"]),
            model=ModelConfig(**d["model"]),
            train=TrainConfig(**d["train"]),
            privacy=PrivacyConfig(**d["privacy"]),
            output=OutputConfig(**d["output"]),
            robust=RobustConfig(**d["robust"]),
        )


def _section_fields(section) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def resolve_settings(flags: Mapping[str, Any], dataset_defaults: Mapping[str, Any]) -> dict:
    """Flags the user set win; then the dataset's defaults; then the global ones.

    The physical batch size, when not given, is capped at the logical one. Privacy is the exception to
    plain layering: ``--noise`` and ``--target-epsilon`` are one choice, so
    giving either replaces the dataset's default for the pair instead of being combined with it.
    """
    settings = dict(GLOBAL_DEFAULTS)
    settings.update(dataset_defaults)
    user = {k: v for k, v in flags.items() if v is not None}
    if "noise" in user or "target_epsilon" in user or user.get("engine") == "non-private":
        settings["noise"] = None
        settings["target_epsilon"] = None
    settings.update(user)
    if "physical_batch_size" not in user and isinstance(settings.get("batch_size"), int):
        # The dataset's physical batch is a memory bound: it only shrinks to fit a smaller logical batch.
        settings["physical_batch_size"] = min(settings["physical_batch_size"], settings["batch_size"])
    _resolve_attack(settings, user)
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
    sections = {}
    for name, cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig),
                      ("privacy", PrivacyConfig), ("output", OutputConfig), ("robust", RobustConfig)):
        missing = [f for f in _section_fields(cls) if f not in s]
        if missing:
            raise UserError(f"no value or default for {', '.join('--' + m.replace('_', '-') for m in missing)}")
        sections[name] = cls(**{f: s[f] for f in _section_fields(cls)})
    config = Config(**sections)
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


def validate(config: Config) -> None:
    """Every check that needs no data. The messages name the flag so the fix is obvious."""
    d, m, t, p, o = config.data, config.model, config.train, config.privacy, config.output
    _require(m.norm in NORMS, f"unknown --norm {m.norm!r}; choose from {', '.join(NORMS)}")
    _require(m.act in ACTIVATIONS, f"unknown --act {m.act!r}; choose from {', '.join(ACTIVATIONS)}")
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
    _require(t.optimizer in OPTIMIZERS, f"unknown --optimizer {t.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    _require(t.lr > 0, f"--lr must be positive, got {t.lr}")
    _require(0 <= t.momentum < 1, f"--momentum must be in [0, 1), got {t.momentum}")
    _require(not (t.optimizer == "adam" and t.momentum != 0),
             "--momentum does not apply to --optimizer adam (its betas play that role); drop --momentum")
    _require(t.seed is None or t.seed >= 0, f"--seed must be non-negative, got {t.seed}")
    _require(t.device in DEVICES, f"unknown --device {t.device!r}; choose from {', '.join(DEVICES)}")
    _require(d.train_subset is None or d.train_subset >= 1, f"--train-subset must be at least 1, got {d.train_subset}")
    _require(d.test_subset is None or d.test_subset >= 1, f"--test-subset must be at least 1, got {d.test_subset}")
    _require(d.val_size >= 0, f"--val-size must be non-negative, got {d.val_size}")
    _require(d.public_size >= 1, f"--public-size must be at least 1, got {d.public_size}")
    _require(not (d.public_holdout and d.public_data),
             "--public-holdout and --public-data both choose the public set; give one of them")
    _require(p.engine in ENGINES, f"unknown --engine {p.engine!r}; choose from {', '.join(ENGINES)}")
    _require(p.accountant in RIGOROUS_ACCOUNTANTS, f"--accountant: {accountant_refusal(p.accountant)}")
    _require(0 < p.delta < 1, f"--delta must be in (0, 1), got {p.delta}")
    _require(p.clip > 0, f"--clip must be positive, got {p.clip}")
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
    _require(o.wandb in WANDB_MODES, f"unknown --wandb {o.wandb!r}; choose from {', '.join(WANDB_MODES)}")
    _require(o.run_id is None or (o.run_id.strip() and "/" not in o.run_id and o.run_id not in (".", "..")),
             f"--run-id must be a plain directory name, got {o.run_id!r}")
    _validate_robust(config.robust)


def _validate_robust(r: RobustConfig) -> None:
    _require(r.attack in ATTACKS, f"unknown --attack {r.attack!r}; choose from {', '.join(ATTACKS)}")
    _require(r.pgd_norm in PGD_NORMS, f"unknown --pgd-norm {r.pgd_norm!r}; choose from {', '.join(PGD_NORMS)}")
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
