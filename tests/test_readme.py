"""The README's tables of keys and defaults, read from the README itself and checked against what
validation resolves: a default changed in one place and not the other fails here."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from support import REPO

from hpsearch.errors import JobError
from hpsearch.hyperparameters import HYPERPARAMETERS
from hpsearch.spec import validate

README = (REPO / "README.md").read_text()
SEARCHED = {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2}}
# The smallest jobs of each kind: every key not given takes its default.
BUILT_IN = {"name": "t", "data": {"dataset": "image_folder"}, "space": SEARCHED}
YOURS = {"name": "t", "data": {"dataset": "python", "factory": "my_data:load"},
         "model": {"kind": "python", "factory": "my_models:build"}, "space": SEARCHED}


def _table(heading: str, stop: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of each row of the README table under ``heading``."""
    part = README.split(heading, 1)[1].split(stop, 1)[0]
    rows = [line.split("|")[1:3] for line in part.splitlines() if line.startswith("| `")]
    return [(key.strip().strip("`"), default.strip()) for key, default in rows]


KEYS = _table("### Keys and defaults", "Hyperparameters the training function knows")
DEFAULTS = [(key, default) for key, default in KEYS if key != "space.<name>"]  # the space: its own table


def _at(d: dict, dotted: str) -> object:
    for part in dotted.split("."):
        d = d[part]
    return d


def _without(raw: dict, dotted: str) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    return raw


def test_the_readme_lists_every_key_of_the_job_file() -> None:
    listed = {key for key, _ in KEYS}
    resolved = {**validate(BUILT_IN).to_dict(), **validate(YOURS).to_dict()}
    flat = set()
    for section, value in resolved.items():
        if isinstance(value, dict) and section not in ("space",):
            for key, inner in value.items():
                if isinstance(inner, dict) and key in ("augment", "final"):
                    flat.update(f"{section}.{key}.{k}" for k in inner)
                else:
                    flat.add(f"{section}.{key}")
        else:
            flat.add(section)
    # searcher and scheduler are listed as one row each; space by its own table
    missing = sorted(k for k in flat - listed if not k.startswith(("search.searcher.", "search.scheduler.", "space")))
    assert missing == []


@pytest.mark.parametrize("key,default", DEFAULTS, ids=[key for key, _ in DEFAULTS])
def test_each_default_in_the_readme_is_the_one_validation_gives(key: str, default: str, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    literal = re.fullmatch(r"`([^`]*)`( \(.*\))?", default)
    job_raw = YOURS if key in ("data.factory", "data.options", "model.factory", "model.hyperparameters") else BUILT_IN
    resolved = validate(job_raw).to_dict()
    if default.startswith("required"):
        with pytest.raises(JobError, match=re.escape(key)):
            validate(_without(job_raw, key))
    elif key == "tracking.uri":
        from hpsearch.tracking import resolve_uri

        assert resolve_uri(None).endswith("/mlflow.db")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
        assert resolve_uri(None) == "http://mlflow.example:5000"
    elif key == "tracking.experiment":
        assert resolved["tracking"]["experiment"] == resolved["name"] == "t"
    elif key == "search.mode":
        assert resolved["search"]["mode"] == "max"
        assert validate({**BUILT_IN, "search": {"metric": "val_loss"}}).search.mode == "min"
    elif default == "none":
        value = resolved
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        assert value is None
    else:
        assert literal, f"{key}: the README's default {default!r} is no literal this test can read"
        expected = yaml.safe_load(literal.group(1))
        actual = _at(resolved, key)
        if isinstance(expected, dict):
            assert {k: actual[k] for k in expected} == expected
        else:
            assert actual == expected


HYPERPARAMETER_ROWS = _table("Hyperparameters the training function knows", "`num_hidden_layers` and `neurons_per_layer` shape")


def test_the_readme_lists_every_hyperparameter_with_its_default() -> None:
    assert [name for name, _ in HYPERPARAMETER_ROWS] == list(HYPERPARAMETERS)
    for name, default in HYPERPARAMETER_ROWS:
        assert yaml.safe_load(default) == HYPERPARAMETERS[name].default, name
