"""Each framework in its own process, no launcher: models, initial weights, the local backend.

Nothing here needs MPI or Horovod; every test starts torch or TensorFlow (marker ``framework``),
so the unit tier (`make test-unit`) leaves them out.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FRAMEWORKS, fw_check

pytestmark = pytest.mark.framework


def test_tensorflow_and_torch_give_the_same_losses(tmp_path):
    """50 SGD steps with momentum while the learning rate warms up: 2.4e-7 apart at most. With
    Keras' own SGD (a velocity of learning-rate-scaled gradients) they were 0.22 apart."""
    runs = {fw: fw_check(fw, "fidelity", tmp_path / f"{fw}.npz")["losses"] for fw in FRAMEWORKS}
    t, f = np.array(runs["torch"]), np.array(runs["tensorflow"])
    assert abs(t[0] - f[0]) <= 1e-5
    assert np.abs(t - f).max() <= 1e-5
    assert t[-1] < t[0] * 0.5                    # it did learn


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_model_parameter_counts_match_the_spec(fw):
    out = fw_check(fw, "models")
    for name, r in out.items():
        assert r["same_names_and_shapes"], name
        assert r["framework_params"] == r["spec_params"], name
    assert out["resnet50"]["framework_params"] == 25_557_032


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet20", "resnet50"])
def test_same_initial_weights_give_the_same_outputs(model, tmp_path):
    for fw in FRAMEWORKS:
        fw_check(fw, "forward", model, tmp_path / f"{fw}.npy")
    t, f = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "tensorflow.npy")
    np.testing.assert_allclose(t, f, rtol=1e-4, atol=1e-4 * np.abs(t).max())


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_backend_state_round_trips(fw):
    out = fw_check(fw, "backend")
    assert all(out.values()), out
