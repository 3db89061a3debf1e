"""Horovod/MPI allreduce training harness.

The core is framework-free: importing ``harness`` loads neither torch, tensorflow, horovod nor
mpi4py. Only the backend chosen at run time imports its framework.

Train your own model::

    import harness
    task = harness.Task(framework="torch", model=build_model, loss=loss_fn,
                        metrics={"acc": accuracy}, data=harness.Data(train=(x, y), test=(x, y)))
    harness.run(task, {"epochs": 5})        # in a script launched by horovodrun/srun/mpirun
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Canonical", "Data", "Task", "TaskError", "Tasks", "run"]

_EXPORTS = {"Task": "harness.task", "Tasks": "harness.task", "Canonical": "harness.task",
            "TaskError": "harness.task", "Data": "harness.data", "run": "harness.api"}


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (so ``import harness`` stays light)."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
