"""Property-based tests: generated job files, valid and broken.

Valid ones validate and survive the round trip through ``job.yaml``; broken ones fail with
messages that each name a field; arbitrary YAML-shaped input never escapes as another exception.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hpsearch.errors import JobError
from hpsearch.hyperparameters import DATASETS, HYPERPARAMETERS, MODEL_HYPERPARAMETERS, MODEL_KINDS, SAMPLERS
from hpsearch.spec import JobSpec, validate

# "space.learning_rate.low: must be ...", "data[':']: unknown key ...": a field path, then the rule.
FIELD = re.compile(r"^(name|seed|data|model|space|search|resources|tracking|storage|serach|extra|\[)[^:]*.*: \S")


def _int_range(lo: int, hi: int) -> st.SearchStrategy[dict]:
    return st.tuples(st.integers(lo, hi), st.integers(0, 5)).map(
        lambda t: {"type": "int", "low": t[0], "high": t[0] + t[1]})


def _param(name: str) -> st.SearchStrategy[Any]:
    hp = HYPERPARAMETERS[name]
    if hp.kind == "choice":
        return st.one_of(st.sampled_from(hp.choices),
                         st.just({"type": "categorical", "choices": list(hp.choices[:2])}))
    if name == "kernel_size":
        return st.sampled_from([1, 3, 5, {"type": "int", "low": 3, "high": 7, "step": 2}])
    if hp.kind == "int":
        low = 0 if name in ("num_hidden_layers", "image_size", "trainable_stages") else 1
        high = 5 if name == "trainable_stages" else 64
        return st.one_of(st.integers(low, high), _int_range(low, high - 5 if high == 64 else low),
                         st.lists(st.integers(low, high), min_size=1, max_size=4, unique=True).map(
                             lambda c: {"type": "categorical", "choices": c}))
    top = 0.9 if name in ("dropout_rate", "momentum") else 1.0
    low = 0.0 if name in ("dropout_rate", "momentum", "weight_decay") else 1e-6
    return st.one_of(
        st.floats(low, top, allow_nan=False),
        st.tuples(st.floats(max(low, 1e-6), top / 2), st.floats(0, top / 2)).map(
            lambda t: {"type": "float", "low": t[0], "high": t[0] + t[1], "log": True}),
        st.integers(1, 9).map(lambda n: {"type": "float", "low": low, "high": low + n * top / 10,
                                         "step": top / 10}),
    )


@st.composite
def valid_jobs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(MODEL_KINDS))
    usable = [n for n in HYPERPARAMETERS if n != "momentum" and kind in MODEL_HYPERPARAMETERS.get(n, (kind,))]
    names = draw(st.lists(st.sampled_from(usable), unique=True))
    space = {n: draw(_param(n)) for n in names}
    metric, mode = draw(st.sampled_from([("val_accuracy", "max"), ("val_loss", "min"), ("train_loss", "min")]))
    scheduler = draw(st.one_of(st.just({"name": "fifo"}),
                               st.builds(lambda g, r: {"name": "asha", "max_t": 60, "grace_period": g,
                                                       "reduction_factor": r},
                                         st.integers(1, 60), st.integers(2, 5))))
    dataset = draw(st.sampled_from(DATASETS))
    model: dict[str, Any] = {"kind": kind}
    if kind == "python":  # the user's own model, with hyperparameters of its own
        own = draw(st.lists(st.sampled_from(["width", "depth", "act"]), unique=True))
        model.update(factory="my_models:build", hyperparameters={n: {"act": "relu"}.get(n, 8) for n in own})
        space.update({n: draw(st.sampled_from([{"type": "int", "low": 1, "high": 9}, 4])) for n in own if n != "act"})
    return {
        "name": draw(st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)),
        "seed": draw(st.integers(0, 2**31)),
        "data": {"dataset": dataset, "val_fraction": draw(st.floats(0.01, 0.5)),
                 **({"factory": "my_data:load", "options": {"n": 3}} if dataset == "python" else {})},
        "model": model,
        "space": space,
        # A space that searches nothing runs one trial (several would train the same configuration).
        "search": {"metric": metric, "mode": mode,
                   "num_samples": draw(st.integers(1, 500)) if any(isinstance(v, dict) for v in space.values()) else 1,
                   "searcher": {"name": "optuna", "sampler": draw(st.sampled_from([s for s in SAMPLERS if s != "grid"]))},
                   "scheduler": scheduler},
        "resources": {"cpu": draw(st.sampled_from([0.5, 1, 2])), "gpu": draw(st.sampled_from([0, 0.25, 1, "auto"]))},
    }


@settings(max_examples=150, deadline=None)
@given(valid_jobs())
def test_valid_jobs_validate_and_round_trip(raw: dict[str, Any]) -> None:
    job = validate(raw)
    assert isinstance(job, JobSpec)
    assert validate(job.to_dict()) == validate(validate(job.to_dict()).to_dict())


# One breakage each: a path into the job and the bad value put there.
BREAKAGES = [
    (("serach",), 1),
    (("search", "num_samples"), 0),
    (("search", "num_samples"), "many"),
    (("search", "metric"), "accuracy"),
    (("search", "searcher", "sampler"), "hyperband"),
    (("search", "scheduler"), {"name": "asha", "grace_period": 9, "max_t": 3}),
    (("search", "scheduler"), {"name": "asha", "reduction_factor": 1.5}),
    (("data", "dataset"), "cifar100"),
    (("data", "val_fraction"), 1.5),
    (("space", "learning_rate"), {"type": "float", "low": 0.1, "high": 0.01}),
    (("space", "learning_rate"), {"type": "float", "low": 0, "high": 0.1, "log": True}),
    (("space", "batch_size"), {"type": "categorical", "choices": []}),
    (("space", "batch_size"), 0),
    (("space", "dropout_rate"), 1.0),
    (("space", "hidden_size"), 64),
    (("model", "kind"), "vit"),
    (("resources", "gpu"), 1.5),
    (("name",), "bad name/with slash"),
    (("seed",), -3),
]


@settings(max_examples=150, deadline=None)
@given(valid_jobs(), st.lists(st.sampled_from(range(len(BREAKAGES))), min_size=1, max_size=3, unique=True))
def test_broken_jobs_name_their_fields(raw: dict[str, Any], which: list[int]) -> None:
    for i in which:
        path, value = BREAKAGES[i]
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    try:
        validate(raw)
    except JobError as e:
        assert e.problems
        for problem in e.problems:
            assert FIELD.match(problem), problem
        named = {p.split(":")[0] for p in e.problems}
        for i in which:
            path = ".".join(BREAKAGES[i][0])
            assert any(n == path or n.startswith(path + ".") or path.startswith(n) for n in named), (path, named)
    else:
        raise AssertionError(f"broken job accepted: {which}")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "seed", "data", "model", "space", "search", "resources",
                                        "tracking", "storage", "extra"]), yaml_values, max_size=9))
def test_arbitrary_input_is_a_clear_error_never_a_crash(raw: dict[str, Any]) -> None:
    try:
        validate(raw)
    except JobError as e:
        assert all(FIELD.match(p) for p in e.problems), e.problems
