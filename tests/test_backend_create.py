"""Choosing a backend by name: clear errors, no framework imported to report them."""

from __future__ import annotations

import sys

import pytest

from harness.backends.base import create, resolve_gradient_path
from harness.config import RunConfig
from harness.env import World
from harness.errors import ConfigError


def test_fit_loop_without_horovod_is_one_clear_error(monkeypatch):
    """allreduce = auto without Horovod resolves to mpi4py, which has no model.fit path."""
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "horovod" else object())
    cfg = RunConfig(framework="tensorflow", tf_loop="fit")
    path = resolve_gradient_path(cfg.allreduce, cfg.mode)
    assert path == "mpi"
    with pytest.raises(ConfigError, match="tf_loop = 'fit' trains with Horovod's Keras optimizer"):
        create(cfg, World(0, 1, 0, 1, "test"), path)
    assert "tensorflow" not in sys.modules
