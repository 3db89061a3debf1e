"""Models defined once per framework with the same architecture and the same initial weights.

Each model folder has ``spec.py`` (framework-free: shapes, parameter count, FLOPs, numpy initial
weights), ``torch_impl.py`` and ``tf_impl.py``. Importing this package imports no framework.

Example::

    from models import get_spec
    spec = get_spec("cnn", input_shape=(8, 8, 1), num_classes=10)
    weights = spec.init_weights(seed=0)          # {canonical name: float32 array}
"""

from __future__ import annotations

import importlib
from types import ModuleType

from models.base import ModelSpec, ParamSpec

# name -> package; "<package>.spec", ".torch_impl" and ".tf_impl" are imported on demand.
REGISTRY: dict[str, str] = {
    "mlp": "models.mlp",
    "cnn": "models.cnn",
    "resnet20": "models.resnet20",
    "resnet50": "models.resnet50",
    "gpt": "models.gpt",
}
FRAMEWORK_MODULES = {"torch": "torch_impl", "tensorflow": "tf_impl"}

__all__ = ["REGISTRY", "ModelSpec", "ParamSpec", "get_spec", "load_impl", "default_input_shape",
           "default_classes", "config_options"]


def _package(name: str) -> str:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: valid models are "
                         f"{', '.join(sorted(REGISTRY))}") from None


def get_spec(name: str, input_shape: tuple[int, ...] | None = None,
             num_classes: int | None = None, **options: int) -> ModelSpec:
    """The framework-free spec of ``name`` for the given input shape (H, W, C; gpt:
    (seq_len,)) and classes (gpt: the vocabulary); ``options`` size the architecture where it
    has them (gpt: layers, dim, heads)."""
    mod = importlib.import_module(_package(name) + ".spec")
    return mod.build_spec(input_shape=input_shape or mod.DEFAULT_INPUT_SHAPE,
                          num_classes=num_classes or mod.DEFAULT_CLASSES, **options)


def config_options(cfg) -> dict[str, int]:
    """The architecture options a run config sets for its model (gpt: its gpt_* keys), for
    :func:`get_spec`."""
    if cfg.model == "gpt":
        return {"layers": cfg.gpt_layers, "dim": cfg.gpt_dim, "heads": cfg.gpt_heads}
    return {}


def default_input_shape(name: str) -> tuple[int, ...]:
    return importlib.import_module(_package(name) + ".spec").DEFAULT_INPUT_SHAPE


def default_classes(name: str) -> int:
    return importlib.import_module(_package(name) + ".spec").DEFAULT_CLASSES


def load_impl(name: str, framework: str) -> ModuleType:
    """The framework implementation module of ``name``: it has ``build(spec)``."""
    if framework not in FRAMEWORK_MODULES:
        raise ValueError(f"unknown framework {framework!r}: valid frameworks are "
                         f"{', '.join(FRAMEWORK_MODULES)}")
    return importlib.import_module(f"{_package(name)}.{FRAMEWORK_MODULES[framework]}")
