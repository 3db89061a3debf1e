"""Tasks: what a user writes to train their own model, data and loss with the harness.

A :class:`Task` is plain framework code for one framework: a function that builds the model
(``torch.nn.Module`` or ``keras.Model``), a loss ``loss(output, y) -> scalar`` (the batch mean),
optional metrics of the same form, and the data. The built-in models (``models/tasks.py``) are
tasks written with this same API. This module imports no framework.

Example (PyTorch)::

    import torch
    from harness import Data, Task

    def model():
        return torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 1))

    task = Task(framework="torch", name="regression", model=model,
                loss=lambda out, y: torch.nn.functional.mse_loss(out[:, 0], y),
                loss_name="mse", data=lambda: Data(train=(x_tr, y_tr), test=(x_te, y_te)))

``harness train --task my_file.py:task`` runs it under any launcher; ``harness.run(task)`` runs
it from the user's own script (``horovodrun -np 2 python my_file.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from harness.errors import ConfigError, HarnessError
from harness.quiet import native_log_filter

if TYPE_CHECKING:
    from harness.config import RunConfig
    from harness.data import Dataset

FRAMEWORKS = ("torch", "tensorflow")
PENDING = "<task object>:pending"       # the config's task while a task object is resolved
#: record fields a metric must not shadow (step, epoch and summary records)
RESERVED = frozenset({"loss", "lr", "step", "epoch", "wall_s", "applied", "kind", "time",
                      "restart", "samples", "step_time_s", "samples_per_s_rank",
                      "samples_per_s_total", "worker", "clock", "staleness", "compute_s",
                      "latency_s", "evaluated_by", "rank", "tokens_per_s_total",
                      "tokens_per_s_per_device"})
_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class TaskError(HarnessError):
    """A task that cannot be loaded or does not fit its model, loss and data."""


class FrameworkMismatch(ConfigError):
    """The task has no version of the run's framework: ``reason`` says why (no fix), ``have``
    lists the frameworks it has."""

    def __init__(self, message: str, reason: str, have: list[str]) -> None:
        super().__init__(message)
        self.reason, self.have = reason, have


@dataclass(frozen=True)
class Canonical:
    """An optional shared weight layout, so that two frameworks' versions of one model start
    from the same weights and can be compared weight by weight (the built-in models have one).

    ``init(seed)`` gives the initial weights by canonical name; ``to_framework(model, w)`` and
    ``from_framework(model, w)`` map a ``{name: array}`` dict between the canonical layout and
    the framework's own parameter names and layouts of the built ``model`` (both cover every
    weight of the model).
    """

    init: Callable[[int], dict]
    to_framework: Callable[[Any, dict], dict]
    from_framework: Callable[[Any, dict], dict]


@dataclass(kw_only=True)
class Task:
    """One model, loss, metrics and data, for one framework.

    * ``model()`` builds the model on each rank (the harness seeds the framework with the run's
      seed first, and rank 0's weights are broadcast, so every rank starts equal).
    * ``loss(output, y)`` returns the batch's mean loss as a scalar tensor.
    * ``metrics``: ``{name: fn(output, y)}``, each a scalar batch mean (e.g. accuracy). A
      metric named ``acc`` (a fraction in [0, 1]) also drives ``target_accuracy`` and the
      accuracy columns.
    * ``data``: a :class:`harness.Data` (or a function returning one, called on each rank).
    * ``loss_name``: what the report calls the loss (``mse``, ``cross_entropy``, ...).
    * ``canonical``: optional :class:`Canonical` weight layout shared with another framework.
    """

    framework: str
    model: Callable[[], Any]
    loss: Callable[[Any, Any], Any]
    data: Any
    metrics: Mapping[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    name: str = "task"
    loss_name: str = "loss"
    canonical: Canonical | None = None
    #: FLOPs of one sample's forward pass, when known (reports derive throughput from it)
    flops_per_sample: int = 0
    #: tokens in one sample, for language models (the loss: mean cross-entropy per token, in
    #: nats): the harness then records tokens/s and the test perplexity, exp(test loss)
    tokens_per_sample: int = 0
    #: run-config values this task trains with unless the config or flags set them
    #: (e.g. ``{"lr": 0.01, "epochs": 20}``)
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.framework not in FRAMEWORKS:
            raise TaskError(f"{where}: framework = {self.framework!r} is not one of "
                            f"{', '.join(FRAMEWORKS)}: pass framework='torch' or 'tensorflow'")
        if not _NAME.fullmatch(self.name):
            raise TaskError(f"task name {self.name!r} must be letters, digits, '_', '.' or "
                            "'-' (it names run folders): rename it")
        for what in ("model", "loss"):
            if not callable(getattr(self, what)):
                raise TaskError(f"{where}: {what} = {getattr(self, what)!r} is not callable: "
                                f"pass a function ({what}=...)")
        if isinstance(self.tokens_per_sample, bool) or not isinstance(self.tokens_per_sample, int) \
                or self.tokens_per_sample < 0:
            raise TaskError(f"{where}: tokens_per_sample = {self.tokens_per_sample!r} must be a "
                            "whole number >= 0 (the tokens in one sample; 0: not a language "
                            "model)")
        self.metrics = dict(self.metrics)
        self.defaults = dict(self.defaults)
        bad = [k for k in self.defaults if k in ("task", "framework")]
        if bad:
            raise TaskError(f"{where}: defaults cannot set {bad[0]!r} (the task decides it)")
        for m, fn in self.metrics.items():
            if not (isinstance(m, str) and _METRIC.fullmatch(m)) or not callable(fn):
                raise TaskError(f"{where}: metric {m!r} must map a name (letters, digits, _) "
                                "to a function fn(output, y)")
            if m in RESERVED or m == self.loss_name or (self.tokens_per_sample
                                                         and m == "perplexity"):
                raise TaskError(f"{where}: metric {m!r} has the name of the loss or of a field "
                                "the harness records: rename it (e.g. 'my_" + m + "')")

    def load_data(self) -> "Dataset":
        """The task's data as a harness Dataset (calls ``data`` if it is a function)."""
        from harness.data import Dataset

        data = self.data() if callable(self.data) and not isinstance(self.data, Dataset) \
            else self.data
        if not isinstance(data, Dataset):
            raise TaskError(f"task {self.name!r}: data gave {type(data).__name__}, not "
                            "harness.Data: return Data(train=(x, y), test=(x, y)) or map-style "
                            "datasets")
        return data


@dataclass(frozen=True)
class Tasks:
    """One model in both frameworks (for ``harness compare``): the run's framework picks."""

    torch: Task | None = None
    tensorflow: Task | None = None

    def __post_init__(self) -> None:
        for fw in FRAMEWORKS:
            t = getattr(self, fw)
            if t is not None and (not isinstance(t, Task) or t.framework != fw):
                raise TaskError(f"Tasks({fw}=...) needs a Task with framework={fw!r}, got "
                                f"{getattr(t, 'framework', type(t).__name__)!r}")

    def get(self, framework: str) -> Task:
        task = getattr(self, framework, None)
        if task is None:
            have = [fw for fw in FRAMEWORKS if getattr(self, fw) is not None]
            if not have:
                raise ConfigError("Tasks() holds no task: give Tasks(torch=..., tensorflow=...)")
            reason = f"this task has no {framework} version (it has {', '.join(have)})"
            raise FrameworkMismatch(f"{reason}: set framework = {have[0]!r}", reason, have)
        return task


# --- finding a task by name ------------------------------------------------------------------

def _import(where: str, label: str):
    """The module of ``PATH.py`` or ``package.module``; the user's own import errors (their
    code) propagate with their traceback."""
    if where.endswith(".py") or "/" in where or where.startswith("."):
        path = Path(where)
        if not path.is_file():
            raise TaskError(f"task file {where!r} (from --task {label}) does not exist: give "
                            "PATH.py:NAME with an existing file, or package.module:NAME")
        name = "harness_task_" + re.sub(r"\W", "_", path.resolve().as_posix())
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TaskError(f"task file {where!r} cannot be imported as Python: give a .py file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.resolve().parent))   # its own helper modules beside it
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    if importlib.util.find_spec(where.split(".")[0]) is None:
        raise TaskError(f"task module {where!r} (from --task {label}) is not importable: give "
                        "PATH.py:NAME, or a module on PYTHONPATH as package.module:NAME")
    return importlib.import_module(where)


def check_task_file(label: str) -> None:
    """A task label's file exists (a launcher checks it before it starts any rank): its
    one-line error, without importing anything."""
    where, _ = split_label(label)
    if (where.endswith(".py") or "/" in where or where.startswith(".")) and \
            not Path(where).is_file():
        _import(where, label)


def split_label(label: str) -> tuple[str, str]:
    where, sep, name = label.rpartition(":")
    if not sep or not where or not name:
        raise TaskError(f"--task {label!r} must be PATH.py:NAME or package.module:NAME, e.g. "
                        "--task examples/torch_own_model.py:task")
    return where, name


def load_task(label: str, cfg: "RunConfig") -> Task:
    """The task ``PATH.py:NAME`` or ``package.module:NAME`` for ``cfg.framework``.

    ``NAME`` may be a :class:`Task`, a :class:`Tasks` pair, or a function ``f(cfg)`` returning
    either (for tasks that read the run config, as the built-in models do). ``cfg`` holds the
    config file's and the flags' values: the defaults of the task it returns are not in it
    yet (they apply to the run after, where the config and flags leave a key unset)."""
    return resolve(task_object(label), cfg, label)


def task_object(label: str) -> Any:
    """What the task label ``PATH.py:NAME`` or ``package.module:NAME`` names (its module
    imported): a Task, a Tasks pair or a task function."""
    where, name = split_label(label)
    with native_log_filter():      # a task module that imports TensorFlow: its notices
        module = _import(where, label)
    if not hasattr(module, name):
        found = [k for k, v in vars(module).items()
                 if isinstance(v, (Task, Tasks)) and not k.startswith("_")]
        raise TaskError(f"{where} does not define {name!r}: it defines "
                        f"{', '.join(found) or 'no Task'}; give one of them after the colon")
    return getattr(module, name)


def is_task_function(obj: Any) -> bool:
    return not isinstance(obj, (Task, Tasks)) and callable(obj) and not inspect.isclass(obj)


def resolve(obj: Any, cfg: "RunConfig", label: str) -> Task:
    """A Task for ``cfg.framework`` from a Task, a Tasks pair or a task function."""
    if is_task_function(obj):
        obj = obj(cfg)
    if isinstance(obj, Tasks):
        return obj.get(cfg.framework)
    if not isinstance(obj, Task):
        raise TaskError(f"{label} is a {type(obj).__name__}, not a harness Task: define it as "
                        "harness.Task(framework=..., model=..., loss=..., data=...)")
    return obj


def configure(obj: Any, values: dict[str, Any], label: str,
              source: str = "config") -> tuple["RunConfig", Task]:
    """The run config and task of a run: ``obj`` is a task (or a ``PATH.py:NAME`` label when it
    is None, from ``values['task']``); ``values`` are the config's and flags' keys, which win
    over the task's ``defaults``; the task's framework is the run's unless ``values`` names
    another (an error)."""
    from harness.config import RunConfig

    if obj is not None and values.get("task"):
        raise ConfigError(f"task = {values['task']!r} (--task, or the config's task key) names "
                          f"a task for `harness train`, but {label} trains the task it is "
                          "given: drop it")
    # options of one framework are checked once the task's framework is known (a task label,
    # even a placeholder, defers that check)
    first = RunConfig.from_dict({**values, "task": values.get("task") or PENDING}, source)
    found = task_object(label) if obj is None else obj
    task = resolve(found, first, label)
    if not is_task_function(found):
        check_builtin_keys(values, task)
    given = "framework" in values
    # validated as a task's config (a task object's too: e.g. data_path for its function)
    final = {"framework": task.framework, **task.defaults, **values,
             "task": values.get("task") or PENDING}
    cfg = RunConfig.from_dict(final, f"{source} or task defaults" if task.defaults else source)
    cfg = check_framework(task, cfg, given)
    if obj is not None:
        cfg.task = None            # no label to record: the script's own task object ran
    return cfg, task


#: run-config keys only the built-in models and datasets read
BUILTIN_KEYS = ("model", "dataset", "synthetic_samples", "text_tokens", "seq_len",
                "gpt_layers", "gpt_dim", "gpt_heads")


def check_builtin_keys(values: dict[str, Any], task: Task) -> None:
    """A task object brings its own model and data: a key that picks a built-in one would be
    silently unused (a task function may read it from its cfg)."""
    unused = [k for k in BUILTIN_KEYS if k in values]
    if unused:
        keys = ", ".join(f"{k} = {values[k]!r}" for k in unused)
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ConfigError(f"{keys} would be unused: task {task.name!r} brings its own model "
                          f"and data; drop them ({flags}, or their config keys), or define the "
                          "task as a function f(cfg) that reads it")


def check_framework(task: Task, cfg: "RunConfig", framework_given: bool) -> "RunConfig":
    """The run's config with the task's framework; an explicit other framework is refused."""
    if task.framework != cfg.framework:
        if framework_given:
            reason = f"task {task.name!r} is a {task.framework} task"
            raise FrameworkMismatch(f"{reason}, but framework = {cfg.framework!r}: drop "
                                    f"--framework or set it to {task.framework!r}", reason,
                                    [task.framework])
        cfg = cfg.replace(framework=task.framework)
    cfg.check_framework_options()
    return cfg


# --- can each framework of a comparison run the task? ---------------------------------------

_PROBE = ("import sys; from harness.api import probe_task; "
          "sys.exit(probe_task(sys.argv[1], sys.argv[2:]))")


def check_frameworks(train_args: list[str], frameworks: list[str]) -> None:
    """Before a comparison starts its first run: every framework in ``frameworks`` can load
    the run's task, if it has one (each in its own process: a task module may import its
    framework, and no process imports both). Raises ConfigError with the fix, or TaskError
    after the user's traceback."""
    import json
    import subprocess

    from harness.config import parse_train_args

    label = parse_train_args(train_args).task
    if label is None:                 # a built-in model: both frameworks have it
        return
    check_task_file(label)
    probes = {fw: subprocess.Popen([sys.executable, "-c", _PROBE, fw, *train_args], text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for fw in frameworks}       # side by side: each mostly imports
    said = {fw: p.communicate() for fw, p in probes.items()}
    loaded = [fw for fw in frameworks if probes[fw].returncode == 0]
    listed = f"--frameworks {','.join(frameworks)}"
    for fw in frameworks:
        code = probes[fw].returncode
        if code == 0:
            continue
        out, err = said[fw]
        mismatch = next((json.loads(line) for line in out.splitlines()
                         if line.startswith('{"mismatch"')), None)
        if mismatch and loaded:
            raise ConfigError(f"{listed}: the {fw} runs cannot train this task "
                              f"({mismatch['mismatch']}): compare --frameworks "
                              f"{','.join(loaded)}, or give harness.Tasks with a {fw} version "
                              "too")
        if mismatch:
            raise ConfigError(f"{listed}: this task has no version for them "
                              f"({mismatch['mismatch']}): use --frameworks "
                              f"{','.join(mismatch['have'])}")
        errors = [line.removeprefix("harness: error: ") for line in err.splitlines()
                  if line.startswith("harness: error: ")]
        if errors:                 # a bad label, file or option: as `harness train` says it
            raise ConfigError(errors[-1] if not loaded else f"the {fw} runs: {errors[-1]}")
        if "Traceback" in err:
            sys.stderr.write(err)
            raise TaskError(f"loading the task for the {fw} runs failed (the traceback above "
                            "is from your code): fix it, then start the comparison again")
        raise TaskError(f"checking that the {fw} runs can load the task ended with exit code "
                        f"{code} and no message: run `harness train --task {label} "
                        f"--framework {fw}` to see why")
