"""Tabular data through hpsearch's data entry point: scikit-learn's breast-cancer set (it ships
with scikit-learn: no download), 569 tumours described by 30 measurements, two classes.

hpsearch calls ``load(**data.options)`` once, in the driver, and does the rest: the validation
split (seeded), per-feature normalisation from the training split, and the checks (labels,
lengths, NaN) before any trial.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def load(test_fraction: float = 0.25, seed: int = 0) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test]), "classes": list(data.target_names)}
