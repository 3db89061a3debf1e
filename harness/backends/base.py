"""The Backend contract every framework implementation fulfils.

The training loop (harness/loop.py) and the parameter server only talk to this interface, so
the PyTorch and TensorFlow implementations cannot drift apart. Implementations are chosen by
name with :func:`create`; only the chosen module imports its framework.

The real asymmetry between the frameworks is part of the contract:
``broadcast_after_first_step`` is False for PyTorch (parameters and optimizer state are
broadcast before step 1) and True for TensorFlow (the optimizer's variables only exist once it
has applied a step, so model and optimizer variables are broadcast right after step 1).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np

from harness.backends.common import (FlatLayout, configure_threads, horovod_features,
                                     horovod_settings_in)
from harness.compress import Compressor
from harness.config import RunConfig
from harness.env import World, mpi_launched
from harness.errors import ConfigError
from harness.task import Task

#: checkpoint exchange-state prefix of each rank's optimizer arrays (local SGD)
OPTIMIZER_ROWS = "opt/"
#: checkpoint exchange-state key of each rank's random generators (dropout masks, a task's own
#: augmentation), one row of bytes per rank
RNG_ROWS = "rng"

# (framework, gradient path) -> "module:Class"
IMPLEMENTATIONS = {
    ("torch", "horovod"): "harness.backends.horovod_torch:HorovodTorchBackend",
    ("torch", "mpi"): "harness.backends.horovod_torch:MPITorchBackend",
    ("torch", "local"): "harness.backends.horovod_torch:LocalTorchBackend",
    ("tensorflow", "horovod"): "harness.backends.horovod_tf:HorovodTFBackend",
    ("tensorflow", "mpi"): "harness.backends.horovod_tf:MPITFBackend",
    ("tensorflow", "local"): "harness.backends.horovod_tf:LocalTFBackend",
    ("tensorflow", "horovod-fit"): "harness.backends.keras_fit:KerasFitBackend",
}


@dataclass
class StepResult:
    loss: float                    # mean loss of this rank's batch
    metrics: dict[str, float]      # each task metric summed over this rank's batch (mean x n)
    applied: bool = True  # False when the update was not applied (non-finite gradients)
    #: seconds spent waiting for the reduced gradients once the local ones existed (host
    #: staging included), on this rank's own clock with no synchronisation added; None where
    #: the path cannot tell it from the backward pass (Horovod's gradient tape, model.fit).
    #: The rest of train_step is the step breakdown's compute (harness/loop.py).
    exchange_s: float | None = None


@dataclass
class BackendInfo:
    framework: str
    gradient_path: str                   # horovod | mpi | local
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """One framework's model, optimizer and gradient exchange for one rank."""

    framework: ClassVar[str]
    gradient_path: ClassVar[str]
    broadcast_after_first_step: ClassVar[bool]
    #: set by ``setup``: the task and the model built from it
    task: Task
    model: Any
    #: the trainable parameters in one flat vector (the parameter server's view)
    layout: FlatLayout

    def __init__(self, cfg: RunConfig, world: World, threads: int | None = None) -> None:
        self.cfg = cfg
        #: the launcher's view until ``init_distributed``, then the runtime's
        self.world = world
        #: compute threads of this rank (``create`` exports them before the framework loads)
        self.threads = configure_threads(cfg, world) if threads is None else threads

    # --- lifecycle ---
    @abstractmethod
    def init_distributed(self) -> World:
        """Start the communication runtime, set ``self.world`` to the world it sees and return
        it (the caller checks it against the launcher's)."""

    @abstractmethod
    def setup(self, task: Task, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        """Build the task's model (seeded with the run's seed; the task's canonical initial
        weights when it has them) and the (wrapped) optimizer, and check on the sample batch
        ``x, y`` that the model, loss and metrics fit together (TaskError otherwise)."""

    @abstractmethod
    def broadcast_state(self, resumed: bool = False) -> None:
        """Make every rank's model and optimizer state equal to rank 0's.

        ``resumed`` (the same on every rank) says rank 0 restored optimizer state that the
        other ranks do not have yet.
        """

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime, once, at the end of a run that did not fail. A failed rank
        exits without it: its peers may be gone, and Horovod's shutdown would wait for them."""

    # --- training ---
    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        """Forward, backward, gradient exchange and update on this rank's batch."""

    @abstractmethod
    def eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
        """(loss, each metric) summed over the batch's samples (batch mean x n), in inference
        mode."""

    @abstractmethod
    def set_lr(self, lr: float) -> None:
        ...

    def update_every(self) -> int:
        """Harness steps per optimizer update. 1 everywhere except where the framework
        accumulates micro-batches across steps itself (``model.fit`` with
        ``backward_passes_per_step``): checkpoints and preemption then wait for an update
        boundary, where no rank holds gradients that a checkpoint would lose."""
        return 1

    # --- state, by the framework's own parameter names ---
    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]:
        """Model weights and buffers (batch-norm statistics) by the framework's own names
        (``state_dict`` keys; Keras variable paths)."""

    @abstractmethod
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        ...

    @abstractmethod
    def get_optimizer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON-able metadata) that restore the optimizer exactly."""

    @abstractmethod
    def set_optimizer_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        ...

    def canonical_weights(self) -> dict[str, np.ndarray] | None:
        """The weights in the task's canonical layout (None when the task has none)."""
        canonical = self.task.canonical
        if canonical is None:
            return None
        return canonical.from_framework(self.model, self.get_weights())

    # --- compressed exchange (harness/compress.py): its per-rank state and bytes ---
    #: set by ``setup`` where the config compresses the flat exchange and there are peers
    compressor: Compressor | None = None
    #: set by the training loop: told True as this rank starts waiting for the other ranks
    #: in a collective and False when they came (``waiting``)
    wait_hook: Callable[[bool, str | None], None] | None = None
    _restored_exchange: dict[str, np.ndarray] | None = None

    @contextmanager
    def waiting(self, what: str | None = None) -> Iterator[None]:
        """A collective (the gradient exchange, local SGD's average, the loop's agreements):
        the loop's watchdog knows this rank waits on the others, so a rank stalled elsewhere
        reports itself first (it names itself, and the launcher stops the job on it).
        ``what``: the phase's name when the wait holds more than the collective. One rank
        waits for no one."""
        hook = self.wait_hook if self.world.size > 1 else None
        if hook is not None:
            hook(True, what)
        try:
            yield
        finally:
            if hook is not None:
                hook(False, what)

    def _make_compressor(self) -> None:  # noqa: B027 - optional hook
        """Set ``compressor`` for the run's config (the end of ``setup``; communication
        mixins that compress supply it)."""

    def _framework_ops(self, hvd: Any) -> Any:
        """This framework's tensor operations for harness/compress.py over Horovod."""
        raise NotImplementedError

    def sent_bytes(self) -> int | None:
        """Bytes this rank sent for the gradient exchange of its last step (ring algorithms'
        count, from the payloads' shapes); None where the path does not say."""
        return None

    def exchange_state(self) -> dict[str, np.ndarray]:
        """Every rank's own state stacked by rank: compression's (error-feedback residuals,
        ...) and, under local SGD, the optimizer's (``opt/<name>``); a collective: every rank
        calls it at the same checkpoint."""
        out = {} if self.compressor is None else self.compressor.state_arrays()
        rng = self._rng_bytes()
        n = self.allreduce_host(np.array([rng.size, -rng.size], np.float64), "max")
        if n[0] == -n[1]:             # the same layout on every rank (always, in practice)
            out[RNG_ROWS] = self._allgather_host(rng)
        if self._optimizer_per_rank():
            arrays, _ = self.get_optimizer_state()
            # PyTorch makes a rank's optimizer state at its first update: a rank that skipped
            # every step so far (nan_policy = skip) has none, and the gathers must match
            n = self.allreduce_host(np.array([len(arrays), -len(arrays)], np.float64), "max")
            if n[0] != -n[1]:
                if self.world.rank == 0:
                    logging.getLogger("harness").warning(
                        "a rank has no optimizer state yet (it skipped every step so far): this "
                        "checkpoint holds rank 0's for every rank, so a resume from it is not "
                        "exact")
                return out
            for key in sorted(arrays):
                out[OPTIMIZER_ROWS + key] = self._allgather_host(arrays[key])
        return out

    def set_exchange_state(self, stacked: dict[str, np.ndarray]) -> None:
        """Rank 0: the checkpoint's compression state, handed out by ``restore_exchange``."""
        self._restored_exchange = stacked

    def restore_exchange(self) -> list[str]:
        """A collective after a resume (after ``broadcast_state``): each rank takes its row of
        rank 0's restored state; returns what started afresh (absent, or saved by another
        number of ranks)."""
        saved, self._restored_exchange = self._restored_exchange, None
        fresh = self._restore_rng_row(saved)
        fresh += [] if self.compressor is None else self.compressor.restore(saved, self.world.rank)
        if self._optimizer_per_rank():
            fresh += self._restore_optimizer_rows(saved)
        return fresh

    # --- random generators: a resumed run draws what the uninterrupted run drew ---
    def rng_parts(self) -> dict[str, np.ndarray]:
        """This rank's random generators' states: NumPy's and Python's global ones (a task's
        own augmentation), and the framework's (backends add theirs: dropout masks)."""
        import random

        version, mt, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": np.array([version, *mt], np.int64),
                "python_gauss": np.array([np.nan if gauss is None else gauss]),
                "numpy": np.asarray(keys, np.uint32),
                "numpy_pos": np.array([pos, has_gauss], np.int64),
                "numpy_gauss": np.array([cached], np.float64)}

    def set_rng_parts(self, parts: dict[str, np.ndarray]) -> None:
        import random

        gauss = float(parts["python_gauss"][0])
        py = [int(v) for v in parts["python"]]
        random.setstate((py[0], tuple(py[1:]), None if np.isnan(gauss) else gauss))
        pos, has_gauss = (int(v) for v in parts["numpy_pos"])
        np.random.set_state(("MT19937", parts["numpy"], pos, has_gauss,
                             float(parts["numpy_gauss"][0])))

    def _rng_bytes(self) -> np.ndarray:
        parts = self.rng_parts()
        return np.concatenate([np.frombuffer(np.ascontiguousarray(parts[k]).tobytes(), np.uint8)
                               for k in sorted(parts)])

    def _restore_rng_row(self, saved: dict[str, np.ndarray] | None) -> list[str]:
        """A collective: each rank takes its row of the checkpoint's generator states, when the
        checkpoint has one per rank in this process's layout; else (another world size, an
        older checkpoint, another device or framework build) the seeded generators go on and
        ``["random generators"]`` is returned."""
        mine = self.rng_parts()
        layout = [(k, mine[k].dtype, mine[k].shape) for k in sorted(mine)]
        width = sum(np.ascontiguousarray(mine[k]).nbytes for k in mine)
        got = None if saved is None else saved.get(RNG_ROWS)
        ok = self.world.rank == 0 and got is not None and \
            got.shape == (self.world.size, width) and got.dtype == np.uint8
        resized = self.world.rank == 0 and got is not None and got.shape[0] != self.world.size
        # every rank's layout is rank 0's, or no rank takes a row (the broadcast's sizes match)
        agreed = self.allreduce_host(np.array([ok, width, -width, resized], np.float64), "max")
        if agreed[0] == 0 or agreed[1] != -agreed[2]:
            # another world size is reported where the run resumes (harness/train.py)
            return [] if agreed[3] else ["random generators"]
        stacked = got if self.world.rank == 0 else np.empty((self.world.size, width), np.uint8)
        row = self._broadcast_host(np.ascontiguousarray(stacked))[self.world.rank]
        parts, at = {}, 0
        for key, dtype, shape in layout:
            size = int(np.prod(shape)) * dtype.itemsize
            parts[key] = np.frombuffer(row[at:at + size].tobytes(), dtype).reshape(shape)
            at += size
        self.set_rng_parts(parts)
        return []

    def _optimizer_per_rank(self) -> bool:
        """Local SGD: each rank's optimizer state is its own (checkpointed per rank)."""
        return bool(self.cfg.local_sgd_period) and self.world.size > 1

    def _restore_optimizer_rows(self, saved: dict[str, np.ndarray] | None) -> list[str]:
        """Each rank's own optimizer state from rank 0's checkpoint rows; without them (a
        checkpoint of another world size, or of a run without local SGD) every rank keeps
        rank 0's, which ``broadcast_state`` gave it."""
        arrays, meta = self.get_optimizer_state()
        if not arrays:
            return []
        size, rank = self.world.size, self.world.rank
        has_rows = rank == 0 and saved is not None and \
            any(k.startswith(OPTIMIZER_ROWS) for k in saved)
        if self.allreduce_host(np.array([1.0 if has_rows else 0.0]), "max")[0] == 0:
            return []     # saved without local SGD: every rank's state was rank 0's, as now

        def fits(key: str) -> bool:
            got = None if saved is None else saved.get(OPTIMIZER_ROWS + key)
            return got is not None and got.shape == (size, *arrays[key].shape) \
                and got.dtype == arrays[key].dtype

        ok = rank == 0 and all(fits(k) for k in arrays)         # rank 0 holds the checkpoint
        if self.allreduce_host(np.array([1.0 if ok else 0.0]), "max")[0] == 0:
            return ["optimizer state per rank"]
        rows = {}
        for key in sorted(arrays):
            a = arrays[key]
            stacked = saved[OPTIMIZER_ROWS + key] if rank == 0 and saved is not None else \
                np.empty((size, *a.shape), a.dtype)
            rows[key] = self._broadcast_host(np.ascontiguousarray(stacked))[rank]
        self.set_optimizer_state(rows, meta)
        return []

    # --- local SGD (harness/localsgd.py) ---
    def local_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        """Forward, backward and update on this rank's own gradients: nothing is exchanged."""
        raise NotImplementedError

    def average_params(self, share: float) -> None:
        """A collective: this rank's trainable parameters become the sum over ranks of
        ``share`` x each rank's (``share`` = 1/size: their mean)."""
        raise NotImplementedError

    def _sum_params(self, flat: Any) -> Any:
        """The sum over ranks of a flat float32 framework tensor (communication mixins)."""
        raise NotImplementedError

    def _to_host(self, t: Any) -> np.ndarray:
        """A framework tensor as a NumPy array (framework backends)."""
        raise NotImplementedError

    def _from_host(self, a: np.ndarray) -> Any:
        """A NumPy array as a framework tensor on this rank's device (framework backends)."""
        raise NotImplementedError

    # --- elastic training (harness/elastic.py; Horovod's elastic API) ---
    def elastic_run(self, func: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``func(state)`` wrapped by the framework's ``hvd.elastic.run``: rerun after a reset
        (a rank lost, hosts added), with the runtime restarted at the new size."""
        raise NotImplementedError(f"{type(self).__name__} has no elastic runtime: elastic "
                                  "training needs allreduce = 'horovod'")

    def bcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (Horovod's ``broadcast_object``; elastic only)."""
        raise NotImplementedError

    def refresh_world(self) -> World:
        """The runtime's world after an elastic reset (``self.world`` updated)."""
        raise NotImplementedError

    def resize(self, share: float) -> None:
        """After an elastic reset: this rank's mean gradient is weighted by ``share`` (its
        slice of the global batch over the global batch) in the reduced sum."""
        raise NotImplementedError

    # --- host arrays between ranks (checkpoints; communication mixins supply them) ---
    def _allgather_host(self, a: np.ndarray) -> np.ndarray:
        """Every rank's ``a`` stacked by rank, (size, *a.shape)."""
        return a[None].copy()

    def _broadcast_host(self, a: np.ndarray) -> np.ndarray:
        """Rank 0's ``a`` (same shape and dtype on every rank)."""
        return a

    # --- flat-vector interface used by the parameter server ---
    @abstractmethod
    def compute_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[StepResult, np.ndarray]:
        """This batch's loss and gradient of the trainable parameters as one flat float32
        vector (``StepResult.applied`` is False if the loss is not finite); no update is
        applied."""

    @abstractmethod
    def get_flat_params(self) -> np.ndarray:
        """The trainable parameters as one flat float32 vector, in the model's order."""

    @abstractmethod
    def set_flat_params(self, flat: np.ndarray) -> None:
        ...

    # --- small host-side collectives (metrics, agreement flags) ---
    @abstractmethod
    def allreduce_host(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce a small float64 vector over all ranks (op: sum or max)."""

    def info(self) -> BackendInfo:
        """Versions and settings recorded with the run (communication mixins add theirs)."""
        return BackendInfo(self.framework, self.gradient_path)

    # --- what a framework backend supplies to the communication mixins (comm.py) ---
    def _host_tensor(self, values: np.ndarray) -> Any:
        """``values`` as this framework's CPU tensor (for Horovod's host-side collectives)."""
        raise NotImplementedError

    def _has_gpu(self) -> bool:
        raise NotImplementedError


class FitBackend(Backend):
    """A backend whose training runs through Keras ``model.fit`` (``tf_loop = "fit"``): the
    loop hands it whole epochs instead of single steps."""

    @abstractmethod
    def callbacks(self) -> list:
        """The framework's own callbacks for one ``fit`` call."""

    @abstractmethod
    def step_callback(self, on_step: Callable[[float, dict[str, float], float], None],
                      before_step: Callable[[], None] | None = None) -> Any:
        """A callback that calls ``before_step()`` before each batch and
        ``on_step(loss, {metric: batch mean}, step_time_s)`` after it."""

    @abstractmethod
    def fit_epoch(self, x: np.ndarray, y: np.ndarray, batch: int, epoch: int,
                  callbacks: list) -> None:
        """Train on this rank's samples ``x, y`` of ``epoch`` (or their rest after a resume),
        in order, ``batch`` per step."""


def resolve_gradient_path(cfg: RunConfig, world: World,
                          env: Mapping[str, str] | None = None,
                          has_cuda: Callable[[], bool] | None = None) -> str:
    """The gradient path that runs: ``cfg.allreduce``, with ``auto`` resolved to the fastest
    path measured that supports the run (``harness bench paths``, docs/benchmarks.md section
    6), so a user gets it without a flag:

    - what only Horovod does (elastic, Adasum, model.fit, the optimizer exchange, Horovod's
      knobs in the config or in the launch's environment, e.g. ``horovodrun
      --timeline-filename``), and fp16 compression (a float16 sum in Horovod, a gather on
      mpi4py), runs on Horovod;
    - one rank exchanges nothing: ``local`` (no Horovod background thread);
    - PyTorch on CPU under an MPI launcher: ``mpi``, one mpi4py Allreduce of the flat buffer
      (at 2 ranks faster than Horovod's flat exchange, whose background thread shares the
      compute cores; TensorFlow's mpi path stages through host arrays and is slower, so
      TensorFlow keeps Horovod, as GPUs do for NCCL);
    - else Horovod when it is installed, else mpi4py.

    ``has_cuda`` is asked last (it imports torch; the thread settings must be made first).
    Parameter-server workers compute locally."""
    if cfg.mode == "async":
        return "local"
    if cfg.allreduce != "auto":
        return cfg.allreduce
    env = os.environ if env is None else env
    horovod = importlib.util.find_spec("horovod") is not None
    mpi4py = importlib.util.find_spec("mpi4py") is not None
    if horovod and (horovod_features(cfg) or horovod_settings_in(env)):
        return "horovod"
    if world.size == 1:
        return "local"                  # fp16 too: one rank compresses nothing
    if cfg.framework == "torch" and mpi4py and mpi_launched(env) \
            and cfg.compression != "fp16" and not (has_cuda and has_cuda()):
        return "mpi"
    if horovod:
        return "horovod"
    return "mpi" if mpi4py else "local"


def warn_unused_horovod_settings(cfg: RunConfig, world: World, path: str,
                                 env: Mapping[str, str] | None = None) -> None:
    """Rank 0 says when the launch sets Horovod's variables (``horovodrun --autotune``,
    ``--timeline-filename``, an ``export``) for a run whose gradient path does not start
    Horovod: they would do nothing, silently."""
    names = horovod_settings_in(os.environ if env is None else env)
    if path != "horovod" and cfg.mode == "sync" and names and world.rank == 0:
        logging.getLogger("harness").warning(
            f"{', '.join(names)} set, but this run's gradient path is {path!r} (allreduce = "
            f"{cfg.allreduce!r}), which does not start Horovod: "
            f"{'it has' if len(names) == 1 else 'they have'} no effect. Set allreduce = "
            "'horovod' to use Horovod, or unset them")


PATH_CODES = ("local", "mpi", "horovod")


def agree_on_path(path: str, cfg: RunConfig, world: World,
                  env: Mapping[str, str] | None = None) -> str:
    """``auto`` resolves from each rank's own environment, and a multi-host ``mpirun``
    forwards only the variables given with ``-x``: a rank with ``HOROVOD_CYCLE_TIME`` (or a
    GPU) would start Horovod while the others start mpi4py, and both would wait in their
    first exchange. Under an MPI launcher the PyTorch ranks (the framework whose choice
    depends on the environment) compare their choices first (one small mpi4py allgather,
    before either runtime starts; Horovod then joins the MPI that mpi4py initialised) and,
    if they differ, all take Horovod, which runs whatever one of them asked for; rank 0 says
    so. A rank whose host lacks mpi4py cannot join: mpi4py belongs on every host (the
    bootstrap installs it)."""
    env = os.environ if env is None else env
    # TensorFlow takes Horovod at 2+ ranks whatever the environment; HOROVOD_MPI_THREADS_DISABLE
    # asks Horovod to start MPI itself, without threads
    if cfg.allreduce != "auto" or cfg.mode != "sync" or cfg.framework != "torch" \
            or world.size == 1 or not mpi_launched(env) or "HOROVOD_MPI_THREADS_DISABLE" in env \
            or importlib.util.find_spec("mpi4py") is None:
        return path
    from harness.backends.mpi_comm import mpi

    MPI = mpi()
    if MPI.COMM_WORLD.Get_size() != world.size:
        return path         # mpi4py is not in the launcher's MPI: check_runtime_world says so
    horovod = importlib.util.find_spec("horovod") is not None
    mine = np.array([PATH_CODES.index(path), horovod], np.int64)
    every = np.empty((MPI.COMM_WORLD.Get_size(), 2), np.int64)
    MPI.COMM_WORLD.Allgather(mine, every)
    if len(set(every[:, 0].tolist())) == 1:
        return path
    chose = "; ".join(f"rank(s) {', '.join(str(r) for r in np.flatnonzero(every[:, 0] == c))} "
                      f"{PATH_CODES[c]}" for c in sorted(set(every[:, 0].tolist())))
    if not every[:, 1].all():
        missing = ", ".join(str(r) for r in np.flatnonzero(every[:, 1] == 0))
        raise ConfigError(f"allreduce = 'auto' chose different gradient paths on the ranks "
                          f"({chose}) and Horovod is not installed on rank(s) {missing}: "
                          "set allreduce = 'mpi' (or install Horovod on every host)",
                          quiet=MPI.COMM_WORLD.Get_rank() != 0)      # every rank stops here
    if MPI.COMM_WORLD.Get_rank() == 0:
        logging.getLogger("harness").warning(
            f"allreduce = 'auto' chose different gradient paths from the ranks' own "
            f"environments ({chose}: HOROVOD_* settings or GPUs differ between hosts): every "
            "rank takes horovod. Forward the same HOROVOD_* settings to every rank (mpirun -x "
            "NAME) or set allreduce explicitly")
    return "horovod"


def create(cfg: RunConfig, world: World, gradient_path: str | None = None) -> Backend:
    """Instantiate the backend for ``cfg.framework`` and ``gradient_path`` (None: the one
    :func:`resolve_gradient_path` picks), importing its framework now."""
    threads = configure_threads(cfg, world)      # before the framework is imported
    if gradient_path is None:
        # PyTorch's CUDA probe imports torch: the module that PyTorch's backends are in
        probe = (lambda: importlib.import_module("harness.backends.horovod_torch")
                 .cuda_available()) if cfg.framework == "torch" else None
        gradient_path = agree_on_path(resolve_gradient_path(cfg, world, has_cuda=probe),
                                      cfg, world)
    warn_unused_horovod_settings(cfg, world, gradient_path)
    key = (cfg.framework, gradient_path + ("-fit" if cfg.tf_loop == "fit" else ""))
    if cfg.tf_loop == "fit" and key not in IMPLEMENTATIONS:
        raise ConfigError(f"tf_loop = 'fit' trains with Horovod's Keras optimizer, but the "
                          f"gradient path here is {gradient_path!r} (Horovod does not import): "
                          "install Horovod (scripts/bootstrap.sh) or set tf_loop = 'custom'")
    if key not in IMPLEMENTATIONS:
        valid = ", ".join(f"{f}/{p}" for f, p in IMPLEMENTATIONS)
        raise ValueError(f"no backend for framework {cfg.framework!r} with gradient path "
                         f"{gradient_path!r}; valid: {valid}")
    module, cls = IMPLEMENTATIONS[key].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, world, threads)
