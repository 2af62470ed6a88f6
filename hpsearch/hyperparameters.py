"""The hyperparameters the training function knows: names, kinds, defaults, rules, which model
kind uses which, and the vocabularies of the job file's other choices.

Declared once; the job's validation (:mod:`hpsearch.spec`), the space, the trainable, the output
tables and the docs all read these. Nothing here imports anything of hpsearch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

# --------------------------------------------------------------------------------------------
# Vocabulary.
# --------------------------------------------------------------------------------------------

# "python": the user's own, from a factory named in the job file (hpsearch.entrypoints).
PYTHON = "python"
DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10", "image_folder", PYTHON)
MODEL_KINDS = ("mlp", "cnn", "resnet18", PYTHON)
# torchvision's names for ResNet-18's weights (torchvision.models.ResNet18_Weights), or none.
RESNET18_WEIGHTS = ("none", "IMAGENET1K_V1", "DEFAULT")
LOADERS = ("memory", "stream")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("Adam", "AdamW", "SGD")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc")
SCHEDULERS = ("asha", "fifo")
METRICS = {"val_accuracy": "max", "val_loss": "min", "train_loss": "min"}


@dataclass(frozen=True)
class Hyperparameter:
    """A name the training function knows, its kind, its default and the rule its values obey."""

    kind: str  # "int" | "float" | "choice"
    default: Any
    rule: str  # shown to users
    ok: Callable[[Any], bool]
    choices: tuple[str, ...] = ()  # the values of a "choice" hyperparameter


HYPERPARAMETERS: dict[str, Hyperparameter] = {
    "num_hidden_layers": Hyperparameter("int", 2, "an integer >= 0", lambda v: v >= 0),
    "neurons_per_layer": Hyperparameter("int", 128, "an integer >= 1", lambda v: v >= 1),
    "epochs": Hyperparameter("int", 10, "an integer >= 1", lambda v: v >= 1),
    "learning_rate": Hyperparameter("float", 1e-3, "a number > 0", lambda v: v > 0),
    "dropout_rate": Hyperparameter("float", 0.2, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "batch_size": Hyperparameter("int", 64, "an integer >= 1", lambda v: v >= 1),
    "optimizer": Hyperparameter(
        "choice", "Adam", f"one of {', '.join(OPTIMIZERS)}", lambda v: v in OPTIMIZERS, OPTIMIZERS
    ),
    "weight_decay": Hyperparameter("float", 0.0, "a number >= 0", lambda v: v >= 0),
    # SGD only (torch's default is 0); sampled only when the trial's optimizer is SGD.
    "momentum": Hyperparameter("float", 0.0, "a number in [0, 1)", lambda v: 0 <= v < 1),
    # cosine: the learning rate falls from learning_rate to ~0 over the trial's epochs (measured:
    # the tutorial MLP on Fashion-MNIST, 20 epochs, 0.9013 validation accuracy against 0.8988
    # constant; benchmarks/search_quality.py); constant keeps it.
    "lr_schedule": Hyperparameter(
        "choice", "cosine", f"one of {', '.join(LR_SCHEDULES)}", lambda v: v in LR_SCHEDULES, LR_SCHEDULES
    ),
    # Input resolution (pixels, square); images are resized on the device. 0 keeps the data's size.
    "image_size": Hyperparameter("int", 0, "an integer >= 0 (0 keeps the images' size)", lambda v: v >= 0),
    # cnn: conv_blocks x (Conv -> BatchNorm -> ReLU -> MaxPool), channels doubling from conv_channels.
    "conv_blocks": Hyperparameter("int", 2, "an integer >= 1", lambda v: v >= 1),
    "conv_channels": Hyperparameter("int", 32, "an integer >= 1", lambda v: v >= 1),
    "kernel_size": Hyperparameter("int", 3, "an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1),
    # resnet18: how many of its stages train, from the top (0: only the new head; 5: all of it, stem
    # included), and the backbone's learning rate as a fraction of learning_rate (the head's).
    "trainable_stages": Hyperparameter("int", 5, "an integer from 0 to 5", lambda v: 0 <= v <= 5),
    "backbone_lr_factor": Hyperparameter("float", 1.0, "a number > 0", lambda v: v > 0),
}

# Which model kinds use a hyperparameter (the rest are used by every kind). A space that sets one
# its model ignores is refused: the trials would spend the search on a value that changes nothing.
# A model of kind python gets those a factory declares (model.hyperparameters), with these rules.
MODEL_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "dropout_rate": ("mlp", "cnn", "resnet18"),
    "num_hidden_layers": ("mlp", "cnn"),
    "neurons_per_layer": ("mlp", "cnn"),
    "conv_blocks": ("cnn",),
    "conv_channels": ("cnn",),
    "kernel_size": ("cnn",),
    "trainable_stages": ("resnet18",),
    "backbone_lr_factor": ("resnet18",),
}


# The kinds of a factory's own hyperparameters, as their values show (and their table column holds).
VALUE_KINDS = {bool: "bool", int: "int", float: "float", str: "choice"}


@dataclass(frozen=True)
class HyperparameterSet:
    """The hyperparameters a job's trials use: those of its model kind, and, for a factory
    (kind python), the ones it declares with their defaults and kinds."""

    kind: str | None = None  # None: every hyperparameter the training function knows
    extra: tuple[tuple[str, str | None, Any], ...] = ()  # a factory's own: (name, kind, default)

    def names(self) -> list[str]:
        own = [name for name in HYPERPARAMETERS
               if self.kind is None or self.kind in MODEL_HYPERPARAMETERS.get(name, (self.kind,))]
        return own + [name for name, _, _ in self.extra if name not in own]

    def kind_of(self, name: str) -> str:
        """``int``, ``float``, ``choice`` (a string) or ``bool``: what its values are."""
        extra = {n: k for n, k, _ in self.extra if k}
        return extra[name] if name in extra else HYPERPARAMETERS[name].kind

    def defaults(self) -> dict[str, Any]:
        out = {name: hp.default for name, hp in HYPERPARAMETERS.items()}
        out.update({name: default for name, _, default in self.extra})
        return out

    def resolve(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Every hyperparameter a trial uses: the sampled ones, defaults for the rest (what a
        user reads in best.yaml and trials.parquet, and what a factory is given)."""
        defaults = self.defaults()
        resolved = {name: config.get(name, defaults[name]) for name in self.names()}
        # Optuna's float steps carry binary noise (0.30000000000000004); 12 digits say what was meant.
        return {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in resolved.items()}


def lr_factor(schedule: str, *, epoch: int, epochs: int) -> float:
    """The share of ``learning_rate`` that epoch ``epoch`` (1-based) of ``epochs`` trains at:
    1 throughout for ``constant``; for ``cosine`` from 1 at the first epoch down to near 0.

    The trainable sets its learning rate by it, and ASHA compares trials at the same point of
    their schedules by it (:mod:`hpsearch.tune.scheduler`).
    """
    import math

    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


def _as_set(used: str | HyperparameterSet | None) -> HyperparameterSet:
    return used if isinstance(used, HyperparameterSet) else HyperparameterSet(used)


def hyperparameter_names(used: str | HyperparameterSet | None = None) -> list[str]:
    """The hyperparameters a model kind (or a job's :class:`HyperparameterSet`) uses; all of the
    training function's when ``used`` is None."""
    return _as_set(used).names()


def resolve_hyperparameters(config: Mapping[str, Any], used: str | HyperparameterSet | None = None) -> dict[str, Any]:
    """Every hyperparameter a trial uses: the sampled ones, defaults for the rest (only those of
    model kind ``used``, or of a job's :class:`HyperparameterSet`, when given)."""
    return _as_set(used).resolve(config)
