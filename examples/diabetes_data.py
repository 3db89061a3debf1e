"""The examples' data: scikit-learn's bundled diabetes regression (442 patients, 10 features,
no download), standardised, with a fixed split of 352 training and 90 test samples. A helper
module beside a task file imports as usual (``harness train --task`` puts the task file's
folder on the path)."""

import numpy as np


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test), float64; the target's mean squared error starts
    near 1 (a standardised target)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:90], order[90:]
    return x[train], y[train], x[test], y[test]
