"""Framework-free pieces both backends share: Horovod settings, threads, flat layouts.

Only functions that receive the framework's operations as arguments live here (as Horovod's
``common/elastic.py`` takes ``bcast_object`` and ``get_rank``, rather than one copy per framework);
nothing in this module imports torch, tensorflow, horovod or mpi4py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from harness.config import RunConfig
from harness.env import World, cores_per_rank
from harness.errors import ConfigError
from harness.quiet import tf_log_level
from harness.task import Task, TaskError


def configure_threads(cfg: RunConfig, world: World) -> int:
    """Per-rank compute threads, exported before the framework is imported.

    Without this every rank starts one thread per core: two ranks on two cores then run ~30x
    slower from oversubscription.
    """
    threads = cfg.threads_per_rank or cores_per_rank(world.local_size)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    tf_log_level()                    # TF_CPP_MIN_LOG_LEVEL: the user's, else 2
    apply_mpi_environment(cfg)
    return threads


def apply_mpi_environment(cfg: RunConfig) -> None:
    """Settings read by MPI_Init in this process, so set before MPI or Horovod starts.

    Horovod's background thread waits in MPI calls every cycle, and Open MPI waits by spinning:
    with one compute thread per core that spin takes the core from the computation. Measured on
    2 cores (resnet20, 1 thread per rank, docs/benchmarks.md): E(2) rose from 0.6 to ~0.9.
    """
    if cfg.mpi_yield_when_idle:
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


def horovod_environment(cfg: RunConfig) -> dict[str, str]:
    """HOROVOD_* variables for the knobs set in the config (None keeps Horovod's default)."""
    env: dict[str, str] = {}
    if cfg.fusion_threshold_mb is not None:
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(cfg.fusion_threshold_mb * 1024 * 1024))
    elif (cfg.framework == "tensorflow" and cfg.exchange == "flat" and cfg.compression == "none"
          and not {"HOROVOD_FUSION_THRESHOLD", "HOROVOD_AUTOTUNE"} &
          set(horovod_settings_in(os.environ))):
        # TensorFlow's flat exchange hands Horovod each large gradient on its own, to reduce
        # in place (HorovodTFBackend._flat_allreduce); fusing them would copy them into
        # Horovod's buffer and out again, the copies that exchange exists to avoid. (A
        # compressor takes the whole vector: no gradient goes apart.)
        env["HOROVOD_FUSION_THRESHOLD"] = "0"
    if "HOROVOD_WAKE_ON_ENQUEUE" not in os.environ:
        # Our patch 0004: an enqueued tensor ends the background thread's sleep, so no step
        # waits out the rest of a cycle (1 ms by default) for a tensor that is already there.
        # The flat exchange and TensorFlow's grouped allreduces enqueue everything at once;
        # DistributedOptimizer's per-parameter hooks give up some fusion for it, which does
        # not pay on one host anyway (docs/benchmarks.md). HOROVOD_WAKE_ON_ENQUEUE=0 keeps
        # Horovod's stock sleep.
        env["HOROVOD_WAKE_ON_ENQUEUE"] = "1"
    if cfg.cycle_time_ms is not None:
        # Horovod's 1 ms stays the default. A longer cycle spares the compute cores idle
        # negotiations; since our patch 0007 (a tensor that waits on other ranks is negotiated
        # again at once) it no longer stalls a step, and on the main job it measured no faster
        # than 1 ms (docs/benchmarks.md section 6).
        env["HOROVOD_CYCLE_TIME"] = repr(cfg.cycle_time_ms)
    if cfg.horovod_timeline:
        env["HOROVOD_TIMELINE"] = os.path.abspath(cfg.horovod_timeline)
    # Horovod's stall inspector names the ranks that did not submit a tensor; past the shutdown
    # time it stops the job instead of waiting for the wall-clock limit.
    check = max(1, int(min(60.0, cfg.stall_timeout_s / 2)))
    env["HOROVOD_STALL_CHECK_TIME_SECONDS"] = str(check)
    env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] = str(int(math.ceil(cfg.stall_timeout_s)))
    return env


#: Horovod reads these when it starts (hvd.init); any other value makes its background thread
#: throw, and the process aborts in C++ (exit 134). Compared without case, as Horovod does.
HOROVOD_CHOICES = {"HOROVOD_CONTROLLER": ("mpi", "gloo"),
                   "HOROVOD_CPU_OPERATIONS": ("mpi", "gloo", "ccl")}
#: numbers Horovod reads with strtol/strtod: what is not a number silently counts as its digits
#: prefix, or 0 (HOROVOD_FUSION_THRESHOLD=64MB is 64 bytes; =abc disables fusion)
HOROVOD_INTEGERS = ("HOROVOD_FUSION_THRESHOLD", "HOROVOD_CACHE_CAPACITY",
                    "HOROVOD_STALL_CHECK_DISABLE", "HOROVOD_STALL_CHECK_TIME_SECONDS",
                    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "HOROVOD_HIERARCHICAL_ALLREDUCE",
                    "HOROVOD_HIERARCHICAL_ALLGATHER", "HOROVOD_TORUS_ALLREDUCE",
                    "HOROVOD_AUTOTUNE",
                    "HOROVOD_NUM_NCCL_STREAMS", "HOROVOD_BATCH_D2D_MEMCOPIES",
                    "HOROVOD_WAKE_ON_ENQUEUE")
HOROVOD_FLOATS = ("HOROVOD_CYCLE_TIME",)
#: set by ``harness train`` from the run config on every start, replacing the environment's
HARNESS_SETS_ALWAYS = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "stall_timeout_s",
                       "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "stall_timeout_s"}


def horovod_variable_problems(env: Mapping[str, str],
                              timeline_here: bool = True) -> list[tuple[str, str, str]]:
    """(variable, problem, fix) for each HOROVOD_* value Horovod would abort on, misread or
    silently not use (a timeline it cannot write). ``env`` is the environment Horovod will
    see; the file system is read for the timeline's folder only, where it is written
    (``timeline_here``: Horovod writes it on rank 0)."""
    problems = []
    for name, valid in HOROVOD_CHOICES.items():
        value = env.get(name)
        if value is not None and value.lower() not in valid:
            problems.append((name, f"{name}={value!r} is not one of {', '.join(valid)} (Horovod "
                                   "would abort at start)",
                             "set one of them, or unset it (horovodrun sets it for its ranks)"))
    for name in (*HOROVOD_INTEGERS, *HOROVOD_FLOATS):
        value = env.get(name)
        if value is None:
            continue
        number = r"[+-]?\d+" if name in HOROVOD_INTEGERS else \
            r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"
        if re.fullmatch(rf"\s*{number}\s*", value):
            continue
        prefix = re.match(rf"\s*{number}", value)
        kind = "a whole number" if name in HOROVOD_INTEGERS else "a number"
        problems.append((name, f"{name}={value!r} is not {kind} (Horovod would read it as "
                               f"{prefix.group().strip() if prefix else '0'})",
                         f"give {kind}, or unset it"))
    timeline = env.get("HOROVOD_TIMELINE", "") if timeline_here else ""
    if timeline and timeline != "DYNAMIC":
        # Horovod (rank 0) says so in one C++ line and trains on without a timeline
        folder = os.path.dirname(os.path.abspath(timeline))
        base = folder
        while not os.path.exists(base):          # the folder may be made (run folders are)
            base = os.path.dirname(base)
        if not (os.path.isdir(base) and os.access(base, os.W_OK)):
            problems.append(("HOROVOD_TIMELINE", f"the Horovod timeline {timeline!r} cannot be "
                             f"written: {base!r} "
                             + ("is not writable" if os.path.isdir(base) else "is not a folder"),
                             "give horovod_timeline (HOROVOD_TIMELINE) a path in a writable "
                             "folder"))
    return problems


def apply_horovod_environment(cfg: RunConfig, rank: int = 0) -> dict[str, str]:
    """Export the config's Horovod settings, after checking every HOROVOD_* value Horovod will
    read: a bad one is a ConfigError here, not an abort inside Horovod's C++ thread. Rank 0,
    which writes the timeline, makes its folder."""
    env = horovod_environment(cfg)
    full = {**os.environ, **env}
    problems = horovod_variable_problems(full, timeline_here=rank == 0)
    if problems:
        _, problem, fix = problems[0]
        raise ConfigError(f"{problem}: {fix}")
    if rank == 0 and full.get("HOROVOD_TIMELINE", "DYNAMIC") != "DYNAMIC":
        os.makedirs(os.path.dirname(os.path.abspath(full["HOROVOD_TIMELINE"])), exist_ok=True)
    os.environ.update(env)
    return env


def check_horovod_combination(cfg: RunConfig, size: int, gloo: bool, gpu: bool) -> None:
    """Reject knob combinations Horovod would fail on mid-run, before the first step."""
    if cfg.reduction == "adasum":
        if gloo and not gpu:
            raise ConfigError("reduction = 'adasum' on CPU needs Horovod's MPI controller, but "
                              "this job runs on Gloo: launch with `horovodrun --mpi` (or mpirun) "
                              "or set reduction = 'average'")
        if size & (size - 1):
            raise ConfigError(f"reduction = 'adasum' needs a power-of-two number of ranks; this "
                              f"job has {size}: use 1, 2, 4, 8, ... ranks or reduction = 'average'")
        if cfg.gradient_predivide_factor != 1.0:
            raise ConfigError("gradient_predivide_factor applies to reduction = 'average' only")


#: Horovod settings a launch may make in the environment (``horovodrun --timeline-filename``,
#: ``--autotune``, ``--fusion-threshold-mb``, ...; or the user's own exports): a run that has
#: them wants Horovod. Flags among them count when not "0".
HOROVOD_TUNING = ("HOROVOD_TIMELINE", "HOROVOD_AUTOTUNE", "HOROVOD_FUSION_THRESHOLD",
                  "HOROVOD_CYCLE_TIME", "HOROVOD_CACHE_CAPACITY",
                  "HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_HIERARCHICAL_ALLGATHER",
                  "HOROVOD_TORUS_ALLREDUCE", "HOROVOD_CPU_OPERATIONS",
                  "HOROVOD_WAKE_ON_ENQUEUE")
HOROVOD_FLAGS = ("HOROVOD_AUTOTUNE", "HOROVOD_HIERARCHICAL_ALLREDUCE",
                 "HOROVOD_HIERARCHICAL_ALLGATHER", "HOROVOD_TORUS_ALLREDUCE")


def horovod_features(cfg: RunConfig) -> list[str]:
    """The options of ``cfg`` that only Horovod's gradient path implements (empty: any path
    runs it)."""
    wanted = [("elastic = true", cfg.elastic), ("tf_loop = 'fit'", cfg.tf_loop == "fit"),
              (f"reduction = {cfg.reduction!r}", cfg.reduction != "average"),
              ("grad_exchange = 'optimizer'", cfg.grad_exchange == "optimizer"),
              ("fusion_threshold_mb", cfg.fusion_threshold_mb is not None),
              ("cycle_time_ms", cfg.cycle_time_ms is not None),
              ("horovod_timeline", cfg.horovod_timeline is not None),
              ("gradient_predivide_factor", cfg.gradient_predivide_factor != 1.0)]
    return [name for name, on in wanted if on]


def horovod_settings_in(env: Mapping[str, str]) -> list[str]:
    """The Horovod tuning variables set in ``env``: a flag when it is a whole number other than
    0, as Horovod reads it, or no whole number at all (``yes``, ``false``), which the Horovod
    path refuses (horovod_variable_problems), so that ``auto`` refuses it too instead of
    ignoring it."""
    def on(v: str) -> bool:
        value = env.get(v, "").strip()
        if v == "HOROVOD_CPU_OPERATIONS" and env.get("HOROVOD_CONTROLLER") == "gloo":
            return False                # horovodrun --gloo sets it itself
        if v not in HOROVOD_FLAGS:
            return value != ""
        m = re.fullmatch(r"[+-]?\d+", value)
        return value != "" and (m is None or int(m.group()) != 0)

    return [v for v in HOROVOD_TUNING if on(v)]


def check_no_horovod_features(cfg: RunConfig, path: str) -> None:
    """The mpi4py and local gradient paths implement the averaging allreduce (compressed or
    not) and nothing else: a Horovod-only option set for them is refused, not ignored."""
    features = horovod_features(cfg)
    if features:
        raise ConfigError(f"{features[0]} needs Horovod, but this run's gradient path is "
                          f"allreduce = {path!r}"
                          + (" (Horovod is not installed)" if cfg.allreduce == "auto" else "")
                          + f": drop {features[0]}, or set allreduce = 'horovod'"
                          + (" (scripts/bootstrap.sh installs it)"
                             if cfg.allreduce == "auto" else ""))


@dataclass(frozen=True)
class FlatLayout:
    """Where each trainable parameter lives in one flat float32 vector (the model's order)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total: int

    @classmethod
    def of(cls, params: list[tuple[str, tuple[int, ...]]]) -> "FlatLayout":
        """The layout of ``(name, shape)`` pairs, in order (a model's trainable parameters)."""
        names, shapes, offsets, off = [], [], [], 0
        for name, shape in params:
            names.append(name)
            shapes.append(tuple(shape))
            offsets.append(off)
            off += math.prod(shape)
        return cls(tuple(names), tuple(shapes), tuple(offsets), off)

    def flatten(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        out = np.empty(self.total, np.float32)
        for name, off in zip(self.names, self.offsets):
            a = weights[name]
            out[off:off + a.size] = a.ravel()
        return out

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {name: flat[off:off + math.prod(shape)].reshape(shape)
                for name, shape, off in zip(self.names, self.shapes, self.offsets)}


def check_weight_names(expected: dict[str, tuple[int, ...]], got: dict[str, np.ndarray],
                       what: str) -> None:
    """Same parameter names and shapes, or an error naming the first difference."""
    from harness.errors import CheckpointError

    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{what} does not fit this model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}; was it saved from another model?")
    for k, shape in expected.items():
        if tuple(got[k].shape) != tuple(shape):
            raise CheckpointError(f"{what}: parameter {k!r} has shape {tuple(got[k].shape)}, "
                                  f"the model expects {tuple(shape)}")


# --- checking a task's model, loss and metrics on a sample batch (both frameworks) -----------

#: words in a framework's message that mean "these shapes or types do not fit together"
_MISFIT = re.compile(r"shape|size of tensor|dimension|rank \d|mismatch|must match|dtype|"
                     r"incompatible|Dims|broadcast|out of bounds|expected (scalar )?type",
                     re.IGNORECASE)
#: ... and those that mean something else (the machine, not the task)
_NOT_MISFIT = re.compile(r"out of memory|ResourceExhausted|OOM|CUDA error|NCCL",
                         re.IGNORECASE)


def misfit(task: Task, what: str, error: Exception, x: np.ndarray, y: np.ndarray,
           out_shape: tuple | None) -> TaskError | None:
    """A one-line TaskError when ``error`` (raised by the task's ``what`` on the sample batch)
    says that the model's output, the data and the loss do not fit together; None for any
    other error, which is the user's own bug and keeps its traceback."""
    if not isinstance(error, (RuntimeError, ValueError, TypeError, IndexError)) and \
            type(error).__name__ not in ("InvalidArgumentError",):
        return None
    if not _MISFIT.search(str(error)) or _NOT_MISFIT.search(str(error)) or \
            type(error).__name__ == "ResourceExhaustedError":
        return None
    message = " ".join(str(error).split())[:300]
    out = f"model output {out_shape}, " if out_shape is not None else ""
    fix = ("Make the model's layers fit each other and the data's x" if what == "model(x)" else
           f"Make {what} fit the model's output and the data's y" if what.startswith("metric")
           else "Make the model's output and the data's y fit what the loss expects")
    return TaskError(f"task {task.name!r}: {what} failed on a batch of {len(x)} training "
                     f"samples (x {x.shape} {x.dtype}, {out}y {y.shape} {y.dtype}): "
                     f"{type(error).__name__}: {message}{user_frame(error)}. {fix}")


def user_frame(error: BaseException) -> str:
    """`` (at FILE:LINE in FUNCTION)`` for the last frame of the error's traceback in the
    user's own code (not the harness's, a framework's or Python's); "" when none is."""
    import sysconfig
    import traceback

    paths = sysconfig.get_paths()
    library = [Path(p).resolve() for p in (paths["stdlib"], paths["purelib"], paths["platlib"],
                                           Path(__file__).parents[1])]
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename).resolve()
        if not frame.filename.startswith("<") and \
                not any(path.is_relative_to(root) for root in library) and \
                not {"site-packages", "dist-packages"} & set(path.parts):
            return f" (at {path.name}:{frame.lineno} in {frame.name})"
    return ""


def initial_canonical_weights(task: Task, model, seed: int,
                              expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The task's canonical initial weights in the framework's names and layouts
    (``expected``: the model's names and shapes); a mapping that does not give exactly those
    is a TaskError naming the task."""
    from harness.errors import CheckpointError

    canonical = task.canonical
    if canonical is None:
        raise TaskError(f"task {task.name!r} has no canonical weight layout")
    try:
        weights = canonical.to_framework(model, canonical.init(seed))
        check_weight_names(expected, weights, "its canonical initial weights")
    except (CheckpointError, KeyError, ValueError, TypeError, IndexError) as e:
        raise TaskError(f"task {task.name!r}: its Canonical mapping does not fit the model "
                        f"({type(e).__name__}: {e}): make to_framework(model, init(seed)) "
                        "return every model weight by the framework's names "
                        f"({', '.join(list(expected)[:4])}, ...)") from e
    return weights


def check_loss_tensor(task: Task, loss: object, is_tensor: bool, kind: str) -> None:
    """The loss is the framework's tensor: a Python or NumPy number has no gradient."""
    if not is_tensor:
        raise TaskError(f"task {task.name!r}: loss(model(x), y) returned "
                        f"{type(loss).__name__} {loss!r:.40}, not a {kind}: return the "
                        "framework's tensor (.item(), float() or .numpy() cut it off from the "
                        "gradient)")


def check_scalar(task: Task, what: str, shape: tuple, n: int) -> None:
    """The loss and each metric give one number per batch (its mean)."""
    if tuple(shape) != ():
        raise TaskError(f"task {task.name!r}: {what} returned shape {tuple(shape)} for a batch "
                        f"of {n}, not a scalar: return the batch mean (e.g. .mean())")


def check_metric(task: Task, name: str, value: Any, n: int) -> None:
    """A metric gives one number per batch (its mean); ``acc`` is a fraction, as
    ``target_accuracy`` and the report's accuracy columns read it."""
    what = f"metric {name!r}"
    check_scalar(task, what, tuple(np.shape(value)), n)
    if name == "acc" and not 0.0 <= float(value) <= 1.0:
        raise TaskError(f"task {task.name!r}: {what} returned {float(value):.6g} for a batch of "
                        f"{n}: acc is the fraction correct, in [0, 1] (target_accuracy and the "
                        "report read it): return the batch mean, not a count or a percentage, "
                        "or name the metric otherwise")


def seed_generators(seed: int) -> None:
    """Python's and NumPy's global generators from the run's seed, as
    ``keras.utils.set_random_seed`` seeds them for TensorFlow runs: a task's own draws from
    them (augmentation, noise) are the same each run, and a resume restores where they were."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
