"""Job files: YAML → a validated, immutable :class:`JobSpec`.

All validation of user input happens here, before Ray, torch or MLflow is imported. Every problem
in a file is collected and reported at once, each naming its field path, the value and the rule
(``space.learning_rate.low: must be > 0 when log is true, got 0``). Ray accepts bad search-space
input silently and ASHA validates with ``assert``; nothing reaches them unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import yaml

from hpsearch import entrypoints
from hpsearch.errors import JobError
from hpsearch.hyperparameters import (
    DATASETS,
    HYPERPARAMETERS,
    LOADERS,
    METRICS,
    MODEL_HYPERPARAMETERS,
    MODEL_KINDS,
    PYTHON,
    RESNET18_WEIGHTS,
    SAMPLERS,
    SCHEDULERS,
    VALUE_KINDS,
    Hyperparameter,
    HyperparameterSet,
)

# --------------------------------------------------------------------------------------------
# The job, as frozen dataclasses.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntParam:
    low: int
    high: int
    step: int = 1
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high, "step": self.step, "log": self.log}


@dataclass(frozen=True)
class FloatParam:
    low: float
    high: float
    step: float | None = None
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "float", "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            d["step"] = self.step
        return d


@dataclass(frozen=True)
class CategoricalParam:
    choices: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


@dataclass(frozen=True)
class FixedParam:
    value: Any

    def to_dict(self) -> Any:
        return self.value


Param = Union[IntParam, FloatParam, CategoricalParam, FixedParam]


@dataclass(frozen=True)
class AugmentSpec:
    """Training-time augmentation, applied to each batch on the trial's device."""

    crop_padding: int = 0  # pixels; random crop of the image padded by this much (0 = off)
    horizontal_flip: bool = False  # flip half the images left-right


@dataclass(frozen=True)
class DataSpec:
    dataset: str
    root: str = "~/.cache/hpsearch"
    download: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # only for data sets without their own test split (digits, image folders)
    image_size: int = 64  # image_folder: images are resized to image_size x image_size when read
    loader: str = "memory"  # memory: decoded once, resident on the device; stream: a DataLoader reads files
    num_workers: int = 2  # DataLoader worker processes per trial (loader: stream, or a factory's Datasets)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    factory: str | None = None  # dataset: python: "module:function" returning the data (hpsearch.data)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in _plain(self).items() if k in data_keys(self.dataset)}


# The keys of ``data`` each kind of data set uses (the rest are refused when given).
_BUILT_IN_DATA = ("dataset", "root", "download", "val_fraction", "test_fraction", "augment")
_DATA_KEYS = {
    "image_folder": _BUILT_IN_DATA + ("image_size", "loader", "num_workers"),
    PYTHON: ("dataset", "factory", "options", "val_fraction", "test_fraction", "num_workers", "augment"),
}


def data_keys(dataset: str) -> tuple[str, ...]:
    return _DATA_KEYS.get(dataset, _BUILT_IN_DATA)


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "mlp"
    batch_norm: bool = True
    weights: str = "none"  # resnet18: torchvision's pretrained weights, or none
    download: bool = True  # fetch pretrained weights missing from torch's cache ($TORCH_HOME)
    factory: str | None = None  # kind python: "module:function" that builds the nn.Module (hpsearch.models)
    # kind python: the factory's own hyperparameters, (name, default); None: no default (set in space)
    hyperparameters: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        if self.kind != PYTHON:
            return {"kind": self.kind, "batch_norm": self.batch_norm, "weights": self.weights,
                    "download": self.download}
        declared: Any = {name: default for name, default in self.hyperparameters}
        if all(default is None for _, default in self.hyperparameters):
            declared = list(declared)
        return {"kind": self.kind, "factory": self.factory, "hyperparameters": declared}

    def resolve(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Every hyperparameter a trial's training uses: the training function's (defaults for
        those not in ``config``) and a factory's own (its defaults likewise)."""
        return HyperparameterSet(None, tuple((n, None, d) for n, d in self.hyperparameters)).resolve(config)

    def for_factory(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        """What a factory is given of the trial's hyperparameters: the training function's that
        apply to every model, and its own."""
        names = HyperparameterSet(self.kind, tuple((n, None, None) for n, _ in self.hyperparameters)).names()
        return {name: hp[name] for name in names if name in hp}


@dataclass(frozen=True)
class SearcherSpec:
    name: str = "optuna"
    sampler: str = "tpe"


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "asha"
    max_t: int | None = None  # epochs; None = the largest epochs the space allows
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 3


@dataclass(frozen=True)
class FinalSpec:
    """The honest final score: the best configuration retrained on train + validation."""

    seeds: int = 3  # retrainings, each with its own seed, scored once on the test set; 0 = off


# ``search.enqueue``: the first trials, before the sampler's own. "defaults": the training
# function's defaults, moved into the space where they fall outside it (so the search never ends
# worse on validation than the untuned defaults); "none"; or a list of hyperparameter mappings.
ENQUEUE_DEFAULTS = "defaults"


@dataclass(frozen=True)
class SearchSpec:
    metric: str = "val_accuracy"
    mode: str = "max"
    num_samples: int = 16  # trials
    max_concurrent_trials: int | None = None  # None = as many as the resources allow
    time_budget_s: float | None = None  # seconds for the whole search; None = no limit
    max_failures: int = 1  # retries of a crashed trial, each from its last checkpoint
    max_failed_trials: int | None = None  # stop the whole search once this many trials failed
    searcher: SearcherSpec = field(default_factory=SearcherSpec)
    # "defaults" (not with the grid sampler), "none", or explicit points: ({name: value, ...}, ...)
    enqueue: str | tuple[dict[str, Any], ...] = ENQUEUE_DEFAULTS
    final: FinalSpec = field(default_factory=FinalSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)


@dataclass(frozen=True)
class ResourcesSpec:
    cpu: float = 1  # per trial; also the trial's torch threads
    # GPUs per trial; a fraction packs trials onto one GPU. None ("auto"): 0.25 where the Ray
    # runtime has GPUs (four small-model trials share each GPU), else 0.
    gpu: float | None = None


@dataclass(frozen=True)
class TrackingSpec:
    enabled: bool = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # None = the job's name


@dataclass(frozen=True)
class JobSpec:
    name: str
    data: DataSpec
    space: tuple[tuple[str, Param], ...]
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage: str = "./hpsearch_runs"
    # Folders the factories' code is imported from (absolute; the job file's folder first).
    code: tuple[str, ...] = ()

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def factories(self) -> list[tuple[str, str]]:
        """The user's entry points: (the job's field, ``module:function``)."""
        found = [("model.factory", self.model.factory), ("data.factory", self.data.factory)]
        return [(where, ref) for where, ref in found if ref]

    @property
    def hyperparameters(self) -> HyperparameterSet:
        """The hyperparameters the trials use: the model kind's, and a factory's own."""
        return HyperparameterSet(self.model.kind, tuple(
            (name, _value_kind(self.param(name), default, name), default)
            for name, default in self.model.hyperparameters))

    def param(self, name: str) -> Param | None:
        return dict(self.space).get(name)

    def max_epochs(self) -> int:
        """The most epochs any trial of this space can run."""
        p = self.param("epochs")
        if p is None:
            return HYPERPARAMETERS["epochs"].default
        if isinstance(p, FixedParam):
            return int(p.value)
        if isinstance(p, CategoricalParam):
            return int(max(p.choices))
        return int(p.high)

    @property
    def max_t(self) -> int:
        return self.search.scheduler.max_t or self.max_epochs()

    def to_dict(self) -> dict[str, Any]:
        """The resolved job as plain data (what ``job.yaml`` holds); loads back to an equal job.

        Derived from the dataclasses' fields; only what the file spells differently from the
        dataclass is said here: ``gpu: auto``, the experiment and ASHA's ``max_t`` resolved, the
        image-folder-only data keys and a FIFO scheduler's unused settings left out.
        """
        d = _plain(self)
        d["space"] = {name: p.to_dict() for name, p in self.space}
        d["data"] = self.data.to_dict()
        d["model"] = self.model.to_dict()
        if not self.code:
            del d["code"]
        d["resources"]["gpu"] = "auto" if self.resources.gpu is None else self.resources.gpu
        d["tracking"]["experiment"] = self.experiment
        if self.tracking.uri:  # a password in the URI stays out of job.yaml, logs and MLflow's params
            d["tracking"]["uri"] = without_credentials(self.tracking.uri)[0]
        d["search"]["scheduler"] = ({"name": "fifo"} if self.search.scheduler.name == "fifo"
                                    else {**d["search"]["scheduler"], "max_t": self.max_t})
        return d


def without_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:pass@host/path`` → (``http://host/path``, user, pass); other URIs unchanged."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc or parts.scheme in ("", "file", "sqlite"):
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return (urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), unquote(user) or None,
            unquote(password) or None)


def _value_kind(param: Param | None, default: Any, name: str) -> str:
    """The kind of a factory hyperparameter's values (its table column): from its space, else its
    default (validation makes the two agree)."""
    if name in HYPERPARAMETERS:
        return HYPERPARAMETERS[name].kind
    values: list[Any]
    if isinstance(param, IntParam):
        return "int"
    if isinstance(param, FloatParam):
        return "float"
    if isinstance(param, CategoricalParam):
        values = list(param.choices)
    elif isinstance(param, FixedParam):
        values = [param.value]
    else:
        values = [default]
    kinds = {VALUE_KINDS[type(v)] for v in values}
    return "float" if kinds == {"int", "float"} else kinds.pop()


def _plain(value: Any) -> Any:
    """A frozen spec as plain YAML data: dataclasses as mappings (in field order), tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


def load_job(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = (), *,
             of_search: bool = False) -> JobSpec:
    """Read, override (``dotted.key=value``) and validate a job file. Raises :class:`JobError`.

    A job with factories imports them from the job file's folder first, and each must be found.
    ``of_search``: the file is a search's own ``job.yaml``, which lists the folders the search
    was started with (those are imported from, and checked, when it runs).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(source, ["file not found; give the path of a job YAML file (see jobs/)"]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise JobError(source, [f"cannot be read: {e}"]) from None
    raw = parse_yaml(text, source)
    apply_overrides(raw, overrides, source)
    job = validate(raw, source=source, base=path.parent)
    if job.factories() and not of_search:
        job = with_code(job, path.parent, source=source)
    return job


def with_code(job: JobSpec, folder: Path, *, source: str) -> JobSpec:
    """The job with ``folder`` (its file's) first among its code folders, its factories checked:
    each module must be found there (or installed) without running it. Raises :class:`JobError`."""
    # The job file's folder, the job's own, the working directory: kept in job.yaml, so a resume
    # from elsewhere imports the same code.
    code = tuple(dict.fromkeys([str(folder.resolve()), *job.code, os.getcwd()]))
    problems = [f"{where}: {problem}" for where, ref in job.factories()
                if (problem := entrypoints.check_findable(where, ref, code))]
    if problems:
        raise JobError(source, problems)
    return replace(job, code=code)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise JobError(source, [f"is not valid YAML{where}: {problem}"]) from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise JobError(source, [f"must be a mapping of keys (name, data, space, ...), got {got}"])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str) -> None:
    """Apply ``--set a.b.c=value`` pairs to the raw job; the value is read as YAML."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"--set {item!r}: expected dotted.key=value, e.g. search.num_samples=8")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise JobError(source, problems)


# --------------------------------------------------------------------------------------------
# Validation. A small collector; each reader returns a value (or a safe placeholder) and notes
# problems, so one pass finds them all.
# --------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MISSING = object()


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; accept it as the number it means."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _join(path: str, key: Any) -> str:
    """``space.learning_rate``, or ``data[':']`` for a key that is no plain name."""
    if isinstance(key, str) and _KEY_RE.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]" if path else f"[{key!r}]"


def _keys(spec: type) -> tuple[str, ...]:
    """The keys a section of the job file may have: its dataclass's fields."""
    return tuple(f.name for f in dataclasses.fields(spec))


def _mapping(p: _Problems, raw: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        p.add(path, f"must be a mapping with keys {', '.join(known)}, got {_show(raw)}")
        return {}
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            p.add(_join(path, key), f"unknown key (known: {', '.join(known)}){did}")
    return raw


def _get(
    p: _Problems,
    raw: dict[str, Any],
    path: str,
    key: str,
    kind: str,
    default: Any = _MISSING,
    rule: Callable[[Any], bool] | None = None,
    rule_text: str = "",
) -> Any:
    """Read one scalar field of ``kind`` (str, bool, int, float, choice list) and check its rule."""
    where = f"{path}.{key}" if path else key
    if key not in raw or raw[key] is None:
        if default is _MISSING:
            p.add(where, f"is required ({rule_text or kind})")
        return None if default is _MISSING else default
    value = raw[key]
    if kind == "str":
        ok = isinstance(value, str)
        expect = "a string"
    elif kind == "bool":
        ok = isinstance(value, bool)
        expect = "true or false"
    elif kind == "int":
        value = _as_number(value)
        ok = _is_number(value) and float(value).is_integer()
        if ok:
            value = int(value)
        expect = "an integer"
    elif kind == "float":
        value = _as_number(value)
        ok = _is_number(value) and math.isfinite(value)
        expect = "a number"
    else:
        raise ValueError(kind)
    if not ok:
        p.add(where, f"must be {rule_text or expect}, got {_show(raw[key])}")
        return None if default is _MISSING else default
    if rule is not None and not rule(value):
        p.add(where, f"must be {rule_text}, got {_show(value)}")
        return None if default is _MISSING else default
    return value


def _one_of(p: _Problems, raw: dict[str, Any], path: str, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
    value = _get(p, raw, path, key, "str", default, lambda v: v in choices, f"one of {', '.join(choices)}")
    return value


def validate(raw: dict[str, Any], *, source: str = "<job>", base: Path | None = None) -> JobSpec:
    """Turn a raw job mapping into a :class:`JobSpec`, or raise :class:`JobError` with every problem.

    ``base``: the folder relative ``code`` folders are read from (the job file's; default: the
    working directory).
    """
    p = _Problems()
    top = _mapping(p, raw, "", _keys(JobSpec))

    name = _get(p, top, "", "name", "str", rule=lambda v: bool(_NAME_RE.match(v)),
                rule_text="a folder-safe name (letters, digits, '.', '_', '-')")
    seed = _get(p, top, "", "seed", "int", JobSpec.seed, lambda v: v >= 0, "an integer >= 0")
    storage = _get(p, top, "", "storage", "str", JobSpec.storage)

    data = _data(p, top.get("data"))
    model = _model(p, top.get("model"))
    search = _search(p, top.get("search"))
    space = _space(p, top.get("space"), sampler=search.searcher.sampler, model=model)
    code = _code(p, top.get("code"), base=base)

    r = _mapping(p, top.get("resources"), "resources", _keys(ResourcesSpec))
    resources = ResourcesSpec(
        cpu=_get(p, r, "resources", "cpu", "float", ResourcesSpec.cpu, lambda v: v > 0, "a number > 0"),
        gpu=None if r.get("gpu") == "auto" else _get(p, r, "resources", "gpu", "float", ResourcesSpec.gpu,
                 lambda v: v == 0 or 0 < v < 1 or float(v).is_integer(),
                 "auto, 0, a fraction in (0, 1), or a whole number of GPUs"),
    )

    t = _mapping(p, top.get("tracking"), "tracking", _keys(TrackingSpec))
    tracking = TrackingSpec(
        enabled=_get(p, t, "tracking", "enabled", "bool", TrackingSpec.enabled),
        uri=_get(p, t, "tracking", "uri", "str", TrackingSpec.uri),
        experiment=_get(p, t, "tracking", "experiment", "str", TrackingSpec.experiment),
    )

    if p.items:
        raise JobError(source, p.items)
    job = JobSpec(name=name, seed=seed, data=data, model=model, space=space, search=search,
                  resources=resources, tracking=tracking, storage=storage, code=code)
    _cross_checks(p, job)
    if p.items:
        raise JobError(source, p.items)
    return job


def _data(p: _Problems, raw: Any) -> DataSpec:
    d = _mapping(p, raw, "data", _keys(DataSpec))
    a = _mapping(p, d.get("augment"), "data.augment", _keys(AugmentSpec))
    data = DataSpec(
        dataset=_one_of(p, d, "data", "dataset", DATASETS),
        root=_get(p, d, "data", "root", "str", DataSpec.root),
        download=_get(p, d, "data", "download", "bool", DataSpec.download),
        val_fraction=_get(p, d, "data", "val_fraction", "float", DataSpec.val_fraction,
                          lambda v: 0 < v < 1, "a number in (0, 1)"),
        test_fraction=_get(p, d, "data", "test_fraction", "float", DataSpec.test_fraction,
                           lambda v: 0 < v < 1, "a number in (0, 1)"),
        image_size=_get(p, d, "data", "image_size", "int", DataSpec.image_size, lambda v: v >= 1,
                        "an integer >= 1 (pixels)"),
        loader=_one_of(p, d, "data", "loader", LOADERS, DataSpec.loader),
        num_workers=_get(p, d, "data", "num_workers", "int", DataSpec.num_workers, lambda v: v >= 0,
                         "an integer >= 0 (0 reads in the trial's own process)"),
        augment=AugmentSpec(
            crop_padding=_get(p, a, "data.augment", "crop_padding", "int", AugmentSpec.crop_padding, lambda v: v >= 0,
                              "an integer >= 0 (pixels)"),
            horizontal_flip=_get(p, a, "data.augment", "horizontal_flip", "bool", AugmentSpec.horizontal_flip),
        ),
    )
    if data.dataset in DATASETS:
        used = data_keys(data.dataset)
        for key in d:
            if key in _keys(DataSpec) and key not in used:
                users = [name for name in DATASETS if key in data_keys(name)]
                p.add(f"data.{key}", f"applies to dataset: {' or '.join(users)} only, not {data.dataset}")
    if data.dataset == PYTHON:
        data = replace(data, factory=_reference(p, d, "data.factory", "the function that returns the data"),
                       options=_options(p, d.get("options"), "data.options"))
    return data


def _reference(p: _Problems, raw: dict[str, Any], path: str, what: str) -> str | None:
    """A ``module:function`` entry point (found on disk later, in :func:`load_job`)."""
    key = path.rpartition(".")[2]
    value = raw.get(key)
    if value is None:
        p.add(path, f"is required: {what}, as {entrypoints.REFERENCE_RULE}")
        return None
    if not entrypoints.is_reference(value):
        p.add(path, f"must be {entrypoints.REFERENCE_RULE}, got {_show(value)}")
        return None
    return value


def _options(p: _Problems, raw: Any, path: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in raw):
        p.add(path, f"must be a mapping of the factory's keyword arguments (e.g. {{n_samples: 1000}}), got {_show(raw)}")
        return {}
    return dict(raw)


def _model(p: _Problems, raw: Any) -> ModelSpec:
    m = _mapping(p, raw, "model", _keys(ModelSpec))
    model = ModelSpec(
        kind=_one_of(p, m, "model", "kind", MODEL_KINDS, ModelSpec.kind),
        batch_norm=_get(p, m, "model", "batch_norm", "bool", ModelSpec.batch_norm),
        weights=_one_of(p, m, "model", "weights", RESNET18_WEIGHTS, ModelSpec.weights),
        download=_get(p, m, "model", "download", "bool", ModelSpec.download),
    )
    if model.kind != "resnet18" and model.weights != "none":
        p.add("model.weights", f"pretrained weights apply to kind: resnet18 only, not {model.kind}")
    own = ("factory", "hyperparameters")
    for key in m:
        if model.kind == PYTHON and key in ("batch_norm", "weights", "download"):
            p.add(f"model.{key}", "is a setting of the built-in models; a factory (kind: python) builds its own")
        elif model.kind != PYTHON and key in own:
            p.add(f"model.{key}", f"applies to kind: python only (your own model), not {model.kind}")
    if model.kind == PYTHON:
        model = replace(model, factory=_reference(p, m, "model.factory", "the function that builds the model"),
                        hyperparameters=_declared(p, m.get("hyperparameters")))
    return model


def _declared(p: _Problems, raw: Any) -> tuple[tuple[str, Any], ...]:
    """``model.hyperparameters``: the factory's own names, a list, or a mapping to their defaults."""
    path = "model.hyperparameters"
    if raw is None:
        return ()
    items = [(name, None) for name in raw] if isinstance(raw, list) else list(raw.items()) if isinstance(raw, dict) else None
    if items is None:
        p.add(path, f"must be a list of names (e.g. [width, depth]) or a mapping of names to defaults, got {_show(raw)}")
        return ()
    out = []
    for name, default in items:
        where = _join(path, name)
        if not isinstance(name, str) or not _KEY_RE.match(name):
            p.add(where, "must be a name (letters, digits and '_')")
        elif name in HYPERPARAMETERS and name not in MODEL_HYPERPARAMETERS:
            p.add(where, f"is the training function's own ({HYPERPARAMETERS[name].rule}); the factory is given it "
                         "anyway: every trial's hyperparameters are passed to it")
        elif default is not None and not _scalar(default):
            p.add(where, f"the default must be a number, a string or true/false, got {_show(default)}")
        elif name in HYPERPARAMETERS and default is not None and _check_value(p, where, HYPERPARAMETERS[name], default) is None:
            pass
        else:
            out.append((name, _as_number(default) if isinstance(default, str) and name in HYPERPARAMETERS else default))
    if len({name for name, _ in out}) != len(out):
        p.add(path, "names a hyperparameter twice")
    return tuple(out)


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, bool, int, float)) and not (isinstance(value, float) and not math.isfinite(value))


def _search(p: _Problems, raw: Any) -> SearchSpec:
    s = _mapping(p, raw, "search", _keys(SearchSpec))
    metric = _one_of(p, s, "search", "metric", tuple(METRICS), SearchSpec.metric)
    mode = _one_of(p, s, "search", "mode", ("max", "min"), METRICS.get(metric, "max"))
    if metric in METRICS and mode in ("max", "min") and mode != METRICS[metric]:
        p.add("search.mode", f"{metric} is best when it is the {'largest' if METRICS[metric] == 'max' else 'smallest'}; "
                             f"use mode: {METRICS[metric]}, got {_show(mode)}")

    sr = _mapping(p, s.get("searcher"), "search.searcher", _keys(SearcherSpec))
    searcher = SearcherSpec(
        name=_one_of(p, sr, "search.searcher", "name", ("optuna",), SearcherSpec.name),
        sampler=_one_of(p, sr, "search.searcher", "sampler", SAMPLERS, SearcherSpec.sampler),
    )

    raw_sched = s.get("scheduler")
    sc = _mapping(p, raw_sched, "search.scheduler", _keys(SchedulerSpec))
    sched_name = _one_of(p, sc, "search.scheduler", "name", SCHEDULERS, SchedulerSpec.name)
    if sched_name == "fifo":
        for key in ("max_t", "grace_period", "reduction_factor"):
            if key in sc:
                p.add(f"search.scheduler.{key}", "only applies to name: asha (fifo runs every trial to its end)")
    scheduler = SchedulerSpec(
        name=sched_name,
        max_t=_get(p, sc, "search.scheduler", "max_t", "int", SchedulerSpec.max_t, lambda v: v >= 1, "an integer >= 1"),
        grace_period=_get(p, sc, "search.scheduler", "grace_period", "int", SchedulerSpec.grace_period, lambda v: v >= 1, "an integer >= 1"),
        reduction_factor=_get(p, sc, "search.scheduler", "reduction_factor", "float", SchedulerSpec.reduction_factor,
                              lambda v: v >= 2, "a number >= 2 (each rung keeps 1/reduction_factor of the trials)"),
    )
    if scheduler.max_t is not None and scheduler.grace_period > scheduler.max_t:
        p.add("search.scheduler.grace_period",
              f"must be <= max_t ({scheduler.max_t}), got {scheduler.grace_period}")

    f = _mapping(p, s.get("final"), "search.final", _keys(FinalSpec))
    final = FinalSpec(seeds=_get(p, f, "search.final", "seeds", "int", FinalSpec.seeds, lambda v: 0 <= v <= 100,
                                 "an integer from 0 to 100 (retrainings of the best configuration; 0 = off)"))

    return SearchSpec(
        enqueue=_enqueue(p, s.get("enqueue"), sampler=searcher.sampler),
        final=final,
        metric=metric,
        mode=mode,
        num_samples=_get(p, s, "search", "num_samples", "int", SearchSpec.num_samples,
                         lambda v: v >= 1, "an integer >= 1 (the number of trials)"),
        max_concurrent_trials=_get(p, s, "search", "max_concurrent_trials", "int", SearchSpec.max_concurrent_trials,
                                   lambda v: v >= 1, "an integer >= 1"),
        time_budget_s=_get(p, s, "search", "time_budget_s", "float", SearchSpec.time_budget_s, lambda v: v > 0, "a number of seconds > 0"),
        max_failures=_get(p, s, "search", "max_failures", "int", SearchSpec.max_failures,
                          lambda v: v >= 0, "an integer >= 0"),
        max_failed_trials=_get(p, s, "search", "max_failed_trials", "int", SearchSpec.max_failed_trials, lambda v: v >= 1,
                               "an integer >= 1 (failed trials that stop the search)"),
        searcher=searcher,
        scheduler=scheduler,
    )


def _enqueue(p: _Problems, raw: Any, *, sampler: str) -> str | tuple[dict[str, Any], ...]:
    """``search.enqueue`` as read; the points are checked against the space in :func:`_cross_checks`."""
    if raw is None:
        return "none" if sampler == "grid" else ENQUEUE_DEFAULTS
    if raw in (ENQUEUE_DEFAULTS, "none"):
        return raw
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(point, dict) for point in raw):
        p.add("search.enqueue", "must be defaults, none, or a list of mappings of hyperparameter values "
                                f"(e.g. [{{learning_rate: 0.001, batch_size: 64}}]), got {_show(raw)}")
        return "none"
    return tuple(dict(point) for point in raw)


def _code(p: _Problems, raw: Any, *, base: Path | None) -> tuple[str, ...]:
    """``code``: folders to import the factories from (relative to the job file's folder)."""
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        p.add("code", f"must be a folder, or a list of folders, holding your modules, got {_show(raw)}")
        return ()
    out = []
    for i, item in enumerate(items):
        folder = (base or Path.cwd()) / os.path.expanduser(item)
        if not folder.is_dir():
            p.add("code" if isinstance(raw, str) else f"code[{i}]", f"{folder} is not a folder")
        elif str(folder.resolve()) not in out:
            out.append(str(folder.resolve()))
    return tuple(out)


def _extra(name: str, spec: Any) -> Hyperparameter:
    """A factory's own hyperparameter: its rules are the factory's, so only its kind is checked."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "int":
        return Hyperparameter("int", None, "an integer", lambda v: True)
    if kind == "float":
        return Hyperparameter("float", None, "a number", lambda v: True)
    return Hyperparameter("any", None, "a number, a string or true/false", lambda v: True)


def _space(p: _Problems, raw: Any, *, sampler: str, model: ModelSpec) -> tuple[tuple[str, Param], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        p.add("space", f"must be a mapping of hyperparameter names to ranges, got {_show(raw)}")
        return ()
    declared = [name for name, _ in model.hyperparameters]
    out = []
    for name, spec in raw.items():
        path = _join("space", name)
        hp = HYPERPARAMETERS.get(name)
        if hp is None and name in declared:
            hp = _extra(name, spec)
        if hp is None:
            known = [*HYPERPARAMETERS, *declared]
            hint = difflib.get_close_matches(str(name), known, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            yours = (f"; your factory's, in model.hyperparameters: {', '.join(declared) or 'none declared'}"
                     if model.kind == PYTHON else "")
            p.add(path, f"unknown hyperparameter (the training function knows: {', '.join(HYPERPARAMETERS)}"
                        f"{yours}){did}")
            continue
        param = _param(p, path, hp, spec, sampler=sampler)
        if param is not None:
            out.append((name, param))
    return tuple(out)


def _check_value(p: _Problems, path: str, hp: Hyperparameter, value: Any) -> Any:
    """One value of a hyperparameter (fixed, a choice, a bound): right type and within its rule."""
    value = _as_number(value)
    if hp.kind == "any":
        ok = _scalar(value)
    elif hp.kind == "choice":
        ok = isinstance(value, str) and hp.ok(value)
    elif hp.kind == "int":
        ok = _is_number(value) and float(value).is_integer() and hp.ok(value)
        value = int(value) if ok else value
    else:
        ok = _is_number(value) and math.isfinite(value) and hp.ok(value)
        value = float(value) if ok else value
    if not ok:
        p.add(path, f"must be {hp.rule}, got {_show(value)}")
        return None
    return value


def _param(p: _Problems, path: str, hp: Hyperparameter, spec: Any, *, sampler: str) -> Param | None:
    if isinstance(spec, list):
        p.add(path, f"a list is ambiguous; write {{type: categorical, choices: {spec}}}")
        return None
    if not isinstance(spec, dict):
        value = _check_value(p, path, hp, spec)
        return None if value is None else FixedParam(value)

    kinds = {"int": ("type", "low", "high", "step", "log"),
             "float": ("type", "low", "high", "step", "log"),
             "categorical": ("type", "choices")}
    kind = spec.get("type")
    if kind not in kinds:
        p.add(f"{path}.type", f"must be one of int, float, categorical, got {_show(kind)}")
        return None
    _mapping(p, spec, path, kinds[kind])
    n_before = len(p.items)

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            p.add(f"{path}.choices", f"must be a non-empty list, got {_show(choices)}")
            return None
        values = [_check_value(p, f"{path}.choices[{i}]", hp, c) for i, c in enumerate(choices)]
        if len(set(map(repr, values))) != len(values):
            p.add(f"{path}.choices", f"has duplicates: {choices}")
        kinds = {VALUE_KINDS.get(type(v)) for v in values}
        if hp.kind == "any" and len(kinds) > 1 and kinds != {"int", "float"}:
            p.add(f"{path}.choices", f"must all be of one kind (numbers, strings, or true/false), got {choices}")
        return None if len(p.items) > n_before else CategoricalParam(tuple(values))

    if hp.kind != kind and not (hp.kind == "float" and kind == "int"):
        want = "categorical" if hp.kind == "choice" else hp.kind
        p.add(f"{path}.type", f"{path.split('.')[-1]} takes {hp.rule}; use type: {want} (or categorical), got {kind}")
        return None
    low = _check_value(p, f"{path}.low", hp, spec.get("low"))
    high = _check_value(p, f"{path}.high", hp, spec.get("high"))
    log = _get(p, spec, path, "log", "bool", False)
    step = _get(p, spec, path, "step", kind, None, lambda v: v > 0, "a number > 0")
    if len(p.items) > n_before:
        return None
    if low > high:
        p.add(path, f"low <= high must hold, got low={low}, high={high}")
    if log and low <= 0:
        p.add(f"{path}.low", f"must be > 0 when log is true, got {low}")
    if log and step is not None and step != 1:
        p.add(path, "step and log cannot be combined (Optuna samples on a grid or on a log scale)")
    if step is not None and low <= high:
        if not whole_steps(high - low, step):
            p.add(f"{path}.step", f"high - low ({high} - {low}) must be a multiple of step ({step})")
    if sampler == "grid" and kind == "float" and step is None:
        p.add(path, "the grid sampler needs a step (or categorical choices) for a float range")
    if len(p.items) > n_before:
        return None
    if kind == "int":
        return IntParam(low=int(low), high=int(high), step=int(step or 1), log=log)
    return FloatParam(low=float(low), high=float(high), step=None if step is None else float(step), log=log)


def _cross_checks(p: _Problems, job: JobSpec) -> None:
    """Rules that tie sections together; run once every section is valid on its own."""
    if job.search.num_samples > 1 and all(isinstance(p_, FixedParam) for _, p_ in job.space):
        p.add("search.num_samples", f"is {job.search.num_samples}, but the space searches nothing (no space, or "
                                    "every value fixed): every trial would train the same configuration; use "
                                    "num_samples: 1 to train it once, or give a hyperparameter a range")
    declared = dict(job.model.hyperparameters)
    for name, _ in job.space:
        kinds = MODEL_HYPERPARAMETERS.get(name)
        if kinds and job.model.kind not in kinds and name not in declared:
            yours = "; to pass it to your factory, name it in model.hyperparameters" if job.model.kind == PYTHON else ""
            p.add(_join("space", name), f"is used by model.kind {' or '.join(kinds)} only, not {job.model.kind}; "
                                        f"remove it or change model.kind{yours}")
    for name, default in declared.items():
        param = job.param(name)
        where = _join("model.hyperparameters", name)
        if param is None and default is None:
            p.add(where, "has no value: give it a range in space, or a default (model.hyperparameters: "
                         f"{{{name}: VALUE}})")
        elif param is not None and default is not None and name not in HYPERPARAMETERS:
            kinds = {_value_kind(param, None, name), _value_kind(None, default, name)}
            if len(kinds) > 1 and kinds != {"int", "float"}:
                p.add(where, f"its default {_show(default)} is not of the kind space.{name} gives "
                             f"({_value_kind(param, None, name)})")
    sched = job.search.scheduler
    if sched.name == "asha":
        if sched.max_t is None and sched.grace_period > job.max_t:
            p.add("search.scheduler.grace_period",
                  f"must be <= the most epochs a trial runs ({job.max_t}), got {sched.grace_period}")
    if job.param("momentum") is not None:
        opt = job.param("optimizer")
        sgd_possible = (opt is None and HYPERPARAMETERS["optimizer"].default == "SGD") or (
            isinstance(opt, FixedParam) and opt.value == "SGD") or (
            isinstance(opt, CategoricalParam) and "SGD" in opt.choices)
        if not sgd_possible:
            p.add("space.momentum", "is used by SGD only, and optimizer can never be SGD here")
    if not isinstance(job.search.enqueue, str):
        _check_enqueued(p, job)
    if job.search.searcher.sampler == "grid":
        size = grid_size(job)
        if size > 100_000:
            p.add("space", f"the grid has {size} points; use fewer values or another sampler (at most 100000)")


def _check_enqueued(p: _Problems, job: JobSpec) -> None:
    """Each enqueued point names searched hyperparameters only, with values inside their ranges."""
    points = job.search.enqueue
    searched = {name: param for name, param in job.space if not isinstance(param, FixedParam)}
    if len(points) > job.search.num_samples:
        p.add("search.enqueue", f"has {len(points)} points but search.num_samples is {job.search.num_samples}; "
                                "the enqueued points are trials of the search")
    for i, point in enumerate(points):
        for name, value in point.items():
            path = f"search.enqueue[{i}].{name}"
            param = searched.get(name)
            if param is None:
                fixed = name in dict(job.space)
                hint = difflib.get_close_matches(str(name), list(searched), n=1)
                p.add(path, ("is fixed in space; only searched hyperparameters can be enqueued" if fixed else
                             f"is not a searched hyperparameter (searched: {', '.join(searched) or 'none'})"
                             + (f"; did you mean {hint[0]!r}?" if hint else "")))
                continue
            value = _as_number(value)
            if not in_space(param, value):
                p.add(path, f"must be a value of the space ({_describe(param)}), got {_show(value)}")


def in_space(param: Param, value: Any) -> bool:
    """Whether ``value`` is one the parameter's range or choices can produce."""
    if isinstance(param, FixedParam):
        return value == param.value
    if isinstance(param, CategoricalParam):
        return any(value == c and type(value) is type(c) for c in param.choices)
    if not _is_number(value) or not param.low <= value <= param.high:
        return False
    if isinstance(param, IntParam) and not float(value).is_integer():
        return False
    if param.step is not None and not param.log:
        return whole_steps(value - param.low, param.step)
    return True


def whole_steps(span: float, step: float) -> bool:
    """Whether ``span`` is a whole number of ``step``s (up to float noise)."""
    n = span / step
    return abs(n - round(n)) <= 1e-9 * max(1.0, abs(n))


def _describe(param: Param) -> str:
    if isinstance(param, CategoricalParam):
        return f"one of {', '.join(map(str, param.choices))}"
    step = f" in steps of {param.step:g}" if getattr(param, "step", None) not in (None, 1) else ""
    return f"from {param.low:g} to {param.high:g}{step}"


def grid_values(param: Param) -> list[Any]:
    """The points a grid sampler visits for one parameter."""
    if isinstance(param, FixedParam):
        return [param.value]
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    step = param.step or 1
    n = int(round((param.high - param.low) / step))
    values = [param.low + i * step for i in range(n + 1)]
    return [int(v) for v in values] if isinstance(param, IntParam) else [round(v, 12) for v in values]


def grid_size(job: JobSpec) -> int:
    size = 1
    for _, param in job.space:
        if not isinstance(param, FixedParam):
            size *= len(grid_values(param))
    return size
