"""The Backend contract says what the backends do: every registered implementation defines each
declared method with the declared signature, and nothing is left abstract.

Each framework is checked in its own process (never torch and TensorFlow in one), by importing
the implementation modules only: no runtime is started and Horovod need not be installed.
"""

from __future__ import annotations

import inspect
import json

import pytest

from conftest import PY, run
from harness.backends import base

CHECK = r"""
import importlib, inspect, json, sys
from harness.backends import base

def declared(cls):
    out = {}
    for klass in reversed(cls.__mro__):
        if klass in (base.Backend, base.FitBackend):
            for name, member in vars(klass).items():
                if inspect.isfunction(member) and not name.startswith("_"):
                    out[name] = member
    return out

problems, checked = [], []
for (framework, path), target in base.IMPLEMENTATIONS.items():
    if framework != sys.argv[1]:
        continue
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    checked.append(name)
    if inspect.isabstract(cls):
        problems.append(f"{name} leaves {sorted(cls.__abstractmethods__)} abstract")
    for attr in ("framework", "gradient_path", "broadcast_after_first_step"):
        if not hasattr(cls, attr):
            problems.append(f"{name} does not set {attr}")
    if cls.framework != framework or cls.gradient_path != path.removesuffix("-fit"):
        problems.append(f"{name} says {cls.framework}/{cls.gradient_path}, registered as "
                        f"{framework}/{path}")
    for meth, decl in declared(cls).items():
        impl = getattr(cls, meth)
        want = [(p.name, p.kind, p.default) for p in inspect.signature(decl).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(impl).parameters.values()]
        if want != got:
            problems.append(f"{name}.{meth}{inspect.signature(impl)} differs from the contract's "
                            f"{meth}{inspect.signature(decl)}")
        ret_d = inspect.signature(decl).return_annotation
        ret_i = inspect.signature(impl).return_annotation
        if ret_i is not inspect.Signature.empty and ret_i != ret_d:
            problems.append(f"{name}.{meth} returns {ret_i}, the contract says {ret_d}")
print(json.dumps({"checked": checked, "problems": problems}))
"""


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_every_implementation_matches_the_contract(framework):
    p = run([PY, "-c", CHECK, framework], env={"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    answer = json.loads(p.stdout.strip().splitlines()[-1])
    expected = [t.split(":")[1] for (f, _), t in base.IMPLEMENTATIONS.items() if f == framework]
    assert answer["checked"] == expected
    assert answer["problems"] == []


def test_the_contract_declares_what_callers_use():
    """The loop's fit path and the parameter server call these; they must be declared."""
    for name in ("compute_gradients", "get_flat_params", "set_flat_params", "update_every",
                 "allreduce_host", "broadcast_state", "shutdown"):
        assert name in vars(base.Backend), name
    for name in ("callbacks", "step_callback", "fit_epoch"):
        assert name in vars(base.FitBackend), name
    sig = inspect.signature(base.Backend.compute_gradients)
    assert list(sig.parameters) == ["self", "x", "y"]
