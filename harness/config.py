"""Run configuration: one typed, flat dataclass loaded from TOML with CLI overrides.

The dataclass is the single source of truth: the TOML keys, the ``harness train`` flags and
the values saved next to every result and checkpoint all come from its fields.

Example::

    cfg = RunConfig.load("configs/compare_digits.toml", overrides={"framework": "tensorflow"})
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.compress import FLAT_ONLY, METHODS, PUSH_METHODS
from harness.errors import ConfigError


def option(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None,
           exclusive_min: bool = False, maximum: float | None = None) -> Any:
    """A dataclass field with the metadata that validation and CLI flags are made from."""
    meta = {"help": help, "choices": choices, "minimum": minimum,
            "exclusive_min": exclusive_min, "maximum": maximum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_opt = option


@dataclass(kw_only=True)
class RunConfig:
    """Everything that defines a run. Per-rank quantities say so in their help."""

    # --- what to train ---
    task: str | None = _opt(None, "your own task, PATH.py:NAME or package.module:NAME (a "
                            "harness.Task: model, loss, metrics, data); replaces model and "
                            "dataset (a task function f(cfg) may read them)")
    framework: str = _opt("torch", "deep learning framework (a task of one framework sets it)",
                          ("torch", "tensorflow"))
    model: str = _opt("mlp", "model name (see `harness models`)",
                      ("mlp", "cnn", "resnet20", "resnet50", "gpt"))
    dataset: str = _opt("digits", "digits (bundled with scikit-learn), synthetic, npz, or "
                        "pysource (gpt: bytes of the Python standard library's own source)",
                        ("digits", "synthetic", "npz", "pysource"))
    data_path: str | None = _opt(None, "npz file with x_train, y_train, x_test, y_test "
                                 "(dataset = npz); with a task, for a task function f(cfg) "
                                 "that reads cfg.data_path")
    synthetic_samples: int = _opt(2048, "training samples of the synthetic dataset", minimum=1)
    # --- the gpt language model (docs/gpt.md) ---
    gpt_layers: int = _opt(2, "gpt: transformer blocks", minimum=1)
    gpt_dim: int = _opt(64, "gpt: embedding width (divides by gpt_heads)", minimum=1)
    gpt_heads: int = _opt(4, "gpt: attention heads", minimum=1)
    seq_len: int = _opt(64, "gpt: tokens per sample (the context length); the pysource windows "
                        "are cut to it, npz token windows must have it", minimum=1)
    text_tokens: int = _opt(262144, "pysource: training tokens taken from the corpus, in "
                            "windows spread evenly over it (the test split takes a quarter as "
                            "many); 0: all of it", minimum=0)
    mode: str = _opt("sync", "sync: allreduce data parallel; async: mpi4py parameter server",
                     ("sync", "async"))
    allreduce: str = _opt("auto", "sync gradient path: horovod, mpi (mpi4py Allreduce of one flat "
                          "buffer), local (one process, no communication runtime), or auto "
                          "(the fastest path measured that supports the run: horovod for "
                          "what only Horovod does (elastic, adasum, tf_loop = fit, "
                          "grad_exchange = optimizer, Horovod's knobs and HOROVOD_* "
                          "settings) and fp16; else local at one rank; mpi for PyTorch on "
                          "CPU under an MPI launcher (mpirun, horovodrun on MPI, srun); "
                          "else horovod, or mpi without Horovod)",
                          ("auto", "horovod", "mpi", "local"))

    # --- optimisation ---
    optimizer: str = _opt("sgd", "optimizer (the parameter server supports sgd only)",
                          ("sgd", "adam"))
    lr: float = _opt(0.05, "learning rate for one rank; scaled by world size when "
                     "lr_scaling = linear", minimum=0.0, exclusive_min=True)
    lr_scaling: str = _opt("linear", "learning-rate scaling with the number of ranks",
                           ("linear", "none"))
    warmup_epochs: float = _opt(0.0, "linear learning-rate warm-up from lr to the scaled lr",
                                minimum=0.0)
    momentum: float = _opt(0.9, "SGD momentum", minimum=0.0, maximum=1.0)
    weight_decay: float = _opt(0.0, "L2 weight decay", minimum=0.0)
    batch_size: int = _opt(32, "samples per rank and step", minimum=1)
    global_batch_size: int | None = _opt(None, "samples per step over all ranks; when set it "
                                         "replaces batch_size (must divide by the world size)",
                                         minimum=1)
    epochs: int = _opt(10, "passes over the training data", minimum=1)
    max_steps: int | None = _opt(None, "stop after this many steps in total", minimum=1)
    seed: int = _opt(0, "seed of the initial weights and of the data order", minimum=0)
    shuffle: bool = _opt(True, "reshuffle the training data every epoch (from the seed)")
    eval_every: int = _opt(1, "evaluate every N epochs (0: only at the end)", minimum=0)
    target_accuracy: float | None = _opt(None, "test accuracy whose first crossing reports "
                                         "time-to-accuracy", minimum=0.0, maximum=1.0)

    # --- outputs ---
    out_dir: str = _opt("results", "folder that holds one sub-folder per run")
    run_name: str | None = _opt(None, "run folder name (default: derived from the config)")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: at epoch ends only)",
                                 minimum=0)
    resume: str = _opt("auto", "auto: resume from the run folder's checkpoint if there is one; "
                       "never: refuse to start over an existing checkpoint; or a checkpoint path")
    log_every: int = _opt(10, "progress line every N steps on rank 0 (and the TensorBoard "
                          "scalars' cadence)", minimum=1)
    tensorboard: bool = _opt(True, "write TensorBoard event files into <run>/tb/ (rank 0)")

    # --- Horovod knobs ---
    compression: str = _opt("none", "gradient compression on the wire (docs/compression.md): "
                            "none, fp16, bf16, int8 (a scale per 512 values), sign (1 bit and "
                            "a scale), topk / randomk (compression_ratio of the values), "
                            "powersgd (rank powersgd_rank factors); all but none and fp16 run "
                            "on the flat exchange", METHODS)
    compression_ratio: float = _opt(0.01, "topk / randomk: the share of the gradient's values "
                                    "each rank sends per step", minimum=0.0,
                                    exclusive_min=True, maximum=1.0)
    powersgd_rank: int = _opt(4, "powersgd: rank of the low-rank factors", minimum=1)
    error_feedback: bool = _opt(True, "int8, sign, topk, randomk, powersgd: keep what "
                                "compression dropped on each rank and add it to the next step "
                                "(checkpointed, so a resume stays exact)")
    local_sgd_period: int = _opt(0, "local SGD (docs/compression.md): each rank takes this "
                                 "many steps on its own, then the ranks average their weights "
                                 "(and at every epoch end); 0: off, gradients every step",
                                 minimum=0)
    local_sgd_start_epoch: int = _opt(0, "post-local SGD: dense gradient exchange for this "
                                      "many epochs, then local SGD", minimum=0)
    local_sgd_weighted: bool = _opt(False, "local SGD: weight each rank's model by the samples "
                                    "it applied since the last average (federated averaging; "
                                    "differs from the plain mean when nan_policy = 'skip' "
                                    "skipped some of a rank's steps)")
    backward_passes_per_step: int = _opt(1, "local gradient accumulation steps per allreduce",
                                         minimum=1)
    reduction: str = _opt("average", "gradient reduction op", ("average", "adasum"))
    grad_exchange: str = _opt("auto", "Horovod gradient exchange: flat (one in-place allreduce "
                              "of one contiguous gradient buffer per step, the fastest path "
                              "measured), optimizer (Horovod's DistributedOptimizer / "
                              "DistributedGradientTape: per-tensor allreduces, overlapping "
                              "backward on GPUs), or auto (flat; optimizer for reduction = "
                              "adasum and tf_loop = fit, which need it)",
                              ("auto", "flat", "optimizer"))
    gradient_predivide_factor: float = _opt(1.0, "divide gradients by this before the sum and "
                                            "by size/this after", minimum=0.0,
                                            exclusive_min=True)
    fusion_threshold_mb: float | None = _opt(None, "Horovod tensor fusion buffer in MiB "
                                             "(default: Horovod's 128; 0 disables fusion)",
                                             minimum=0.0)
    cycle_time_ms: float | None = _opt(None, "Horovod cycle time in ms (default: Horovod's "
                                       "1; an enqueued tensor wakes Horovod's thread before "
                                       "it ends)",
                                       minimum=0.0, exclusive_min=True)
    horovod_timeline: str | None = _opt(None, "write Horovod's timeline (Chrome trace JSON) to "
                                        "this file")
    threads_per_rank: int | None = _opt(None, "compute threads per rank (default: cores on the "
                                        "node divided by ranks on the node)", minimum=1)
    mpi_yield_when_idle: bool = _opt(True, "Open MPI: waiting threads (Horovod's background "
                                     "thread, parameter servers) yield the core instead of "
                                     "spinning, so they do not slow the compute thread beside "
                                     "them; an OMPI_MCA_mpi_yield_when_idle already set wins")

    # --- TensorFlow ---
    tf_loop: str = _opt("custom", "TensorFlow training style: custom (GradientTape) or fit "
                        "(model.fit with Horovod callbacks)", ("custom", "fit"))
    keras: str = _opt("keras3", "Keras flavour: keras3, or legacy (tf_keras, Keras 2)",
                      ("keras3", "legacy"))

    # --- asynchronous parameter server ---
    ps_servers: int = _opt(1, "server ranks (placed first); the other ranks are workers",
                           minimum=1)
    ps_consistency: str = _opt("async", "async (unbounded staleness), ssp (bounded) or bsp "
                               "(synchronous)", ("async", "ssp", "bsp"))
    ps_staleness: int = _opt(3, "ssp: how many versions a worker may run ahead of the slowest",
                             minimum=0)
    ps_staleness_lr: bool = _opt(False, "scale each update's learning rate by 1/staleness")
    ps_on_worker_failure: str = _opt("continue", "a worker that raises: continue with the rest, "
                                     "or abort the job", ("continue", "abort"))
    ps_join: bool = _opt(False, "let a worker started later (`harness join RUN_DIR`) take the "
                         "place of one that failed; launch with `harness launch --launcher "
                         "mpirun`, which starts the ompi-server both jobs need (docs/elastic.md)")
    ps_join_lost_after_s: float = _opt(15.0, "ps_join: seconds a joined worker's heartbeat (a "
                                       "file it rewrites every second) may stand still before "
                                       "the servers count it lost and free its slot",
                                       minimum=5.0)
    straggler_rank: int | None = _opt(None, "make this rank slow, for experiments", minimum=0)
    straggler_factor: float = _opt(2.0, "the straggler's step time as a multiple of its "
                                   "compute time", minimum=1.0)

    # --- elastic training (docs/elastic.md) ---
    elastic: bool = _opt(False, "elastic training on Horovod's elastic API: a lost rank makes "
                         "the others roll back to the last commit and go on at the smaller "
                         "size; a host that comes back makes the job grow (launch with "
                         "`harness launch --elastic`)")
    min_ranks: int | None = _opt(None, "elastic: the fewest ranks the job trains with (below "
                                 "it the job ends with a checkpoint; default 1)", minimum=1)
    max_ranks: int | None = _opt(None, "elastic: the most ranks the job grows to (default: no "
                                 "limit but the hosts')", minimum=1)
    commit_every: int = _opt(10, "elastic: steps between commits of the training state to "
                             "host memory (a lost rank costs at most this many steps)",
                             minimum=1)

    # --- reliability ---
    stall_timeout_s: float = _opt(300.0, "report a rank that makes no progress for this long "
                                  "and stop the job", minimum=1.0)
    nan_policy: str = _opt("stop", "non-finite loss or gradients: stop the run, or skip the "
                           "step", ("stop", "skip"))
    agree_every: int = _opt(20, "steps between the ranks' agreement on stopping "
                            "(preemption, errors)", minimum=1)

    def __post_init__(self) -> None:
        validate_fields(self)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.task is not None and not (self.task.rpartition(":")[0] and
                                          self.task.rpartition(":")[2]):  # PATH.py:NAME
            raise ConfigError(f"task = {self.task!r} must be PATH.py:NAME or "
                              "package.module:NAME, e.g. examples/torch_own_model.py:task")
        if self.run_name is not None and not _plain_folder_name(self.run_name):
            raise ConfigError(f"run_name = {self.run_name!r} must be one plain folder name "
                              "(no '/', not '.' or '..'; it is made inside out_dir), e.g. "
                              "run_name = 'baseline'; set out_dir for where runs go")
        if self.dataset == "npz" and not self.data_path:
            raise ConfigError("dataset = 'npz' needs data_path: set data_path = "
                              "'/path/to/data.npz' (arrays x_train, y_train, x_test, y_test)")
        if self.dataset != "npz" and self.data_path and self.task is None:
            raise ConfigError(f"data_path = {self.data_path!r} is only read when dataset = 'npz' "
                              f"(dataset is {self.dataset!r}): drop data_path or set "
                              "dataset = 'npz'")
        self._check_model_data()
        if self.mode == "async" and self.optimizer != "sgd":
            raise ConfigError(f"optimizer = {self.optimizer!r} is not available in async mode: "
                              "the parameter servers run SGD with momentum; set optimizer = 'sgd'")
        if self.task is None:       # a task's own framework is known once it is loaded
            self.check_framework_options()
        if self.tf_loop == "fit" and self.allreduce not in ("auto", "horovod"):
            raise ConfigError("tf_loop = 'fit' trains with Horovod's Keras DistributedOptimizer: "
                              f"set allreduce = 'horovod' (not {self.allreduce!r})")
        if self.tf_loop == "fit" and self.mode == "async":
            raise ConfigError("tf_loop = 'fit' runs in sync mode only: set mode = 'sync' or "
                              "tf_loop = 'custom'")
        if self.tf_loop == "fit" and self.nan_policy == "skip":
            raise ConfigError("nan_policy = 'skip' is not possible with tf_loop = 'fit': "
                              "Horovod's Keras optimizer applies the update inside model.fit, "
                              "where the harness cannot skip it; set tf_loop = 'custom' or "
                              "nan_policy = 'stop' (a non-finite loss stops the run)")
        if self.tf_loop == "fit" and self.reduction == "adasum":
            # Horovod's Keras DistributedOptimizer takes op = Average or Sum only; before this
            # check it was simply not given the op, and trained with the average
            raise ConfigError("reduction = 'adasum' is not available with tf_loop = 'fit': "
                              "Horovod's Keras DistributedOptimizer reduces with Average or Sum "
                              "only; set tf_loop = 'custom' (its step loop reduces with Adasum) "
                              "or reduction = 'average'")
        if self.grad_exchange == "flat" and self.reduction == "adasum":
            raise ConfigError("reduction = 'adasum' combines gradients layer by layer; it needs "
                              "grad_exchange = 'optimizer' (or 'auto')")
        if self.reduction == "adasum" and self.nan_policy == "skip" \
                and self.framework == "torch" and self.mode == "sync":
            # hvd.DistributedOptimizer with Adasum cannot synchronize apart from its step
            # ("Skipping synchronization is not supported"), so the reduced gradients cannot
            # be checked before the update
            raise ConfigError("nan_policy = 'skip' with reduction = 'adasum' is not possible in "
                              "PyTorch: Horovod's Adasum optimizer updates as it reduces; set "
                              "nan_policy = 'stop' or reduction = 'average'")
        if self.grad_exchange == "flat" and self.tf_loop == "fit":
            raise ConfigError("tf_loop = 'fit' reduces gradients in Horovod's Keras "
                              "DistributedOptimizer: set grad_exchange = 'optimizer' (or 'auto')")
        self._check_compression()
        self._check_local_sgd()
        self._check_elastic()
        self._check_ps_join()
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise ConfigError("resume must be 'auto', 'never' or a checkpoint path")

    def _check_ps_join(self) -> None:
        if not self.ps_join:
            return
        fix = [(self.mode != "async", "set mode = 'async' (sync jobs grow with elastic = true)"),
               (self.ps_consistency == "bsp", "a worker that joins later is clocks behind the "
                "others, which bsp cannot average: set ps_consistency = 'async' or 'ssp'"),
               (self.ps_on_worker_failure == "abort", "a failed worker ends the job before one "
                "can join: set ps_on_worker_failure = 'continue'")]
        for bad, why in fix:
            if bad:
                raise ConfigError(f"ps_join = true: {why}, or drop ps_join")

    def _check_model_data(self) -> None:
        if self.task is not None:
            return
        if self.model == "gpt":
            if self.dataset not in ("pysource", "npz", "synthetic"):
                raise ConfigError(f"model = 'gpt' is a language model; dataset = "
                                  f"{self.dataset!r} holds images: set dataset = 'pysource', "
                                  "'npz' (token windows) or 'synthetic' (random tokens)")
            if self.gpt_dim % self.gpt_heads:
                raise ConfigError(f"gpt_dim = {self.gpt_dim} does not divide into gpt_heads = "
                                  f"{self.gpt_heads} heads: choose a gpt_dim that is a multiple "
                                  "of gpt_heads")
        elif self.dataset == "pysource":
            raise ConfigError(f"dataset = 'pysource' is text for model = 'gpt', not "
                              f"{self.model!r}: set model = 'gpt'")

    def _check_compression(self) -> None:
        method = self.compression
        if self.mode == "async":
            if method not in ("none", *PUSH_METHODS):
                raise ConfigError(f"compression = {method!r} compresses the sync gradient "
                                  "exchange; the parameter server's workers push with "
                                  f"{' or '.join(PUSH_METHODS)}: set one of them, 'none', or "
                                  "mode = 'sync'")
            return
        if method not in FLAT_ONLY:
            return
        if self.reduction == "adasum":
            raise ConfigError(f"compression = {method!r} cannot be combined with reduction = "
                              "'adasum' (Adasum combines whole gradients layer by layer): set "
                              "reduction = 'average' or compression = 'none' / 'fp16'")
        if self.tf_loop == "fit":
            raise ConfigError(f"compression = {method!r} runs on the flat exchange, but tf_loop = "
                              "'fit' reduces in Horovod's Keras optimizer: set tf_loop = 'custom' "
                              "or compression = 'none' / 'fp16'")
        if self.grad_exchange == "optimizer":
            raise ConfigError(f"compression = {method!r} runs on the flat exchange: set "
                              "grad_exchange = 'flat' (or 'auto'), or compression = 'none' / "
                              "'fp16'")

    def _check_local_sgd(self) -> None:
        period = self.local_sgd_period
        if not period:
            if self.local_sgd_start_epoch or self.local_sgd_weighted:
                key = "local_sgd_start_epoch" if self.local_sgd_start_epoch \
                    else "local_sgd_weighted"
                raise ConfigError(f"{key} is set but local SGD is off: set local_sgd_period "
                                  f"(steps between averages, e.g. 8) or drop {key}")
            return
        fixes = [(self.mode == "async", "the parameter server already lets workers run "
                                        "apart: set mode = 'sync'"),
                 (self.reduction == "adasum", "set reduction = 'average'"),
                 (self.tf_loop == "fit", "set tf_loop = 'custom'"),
                 (self.grad_exchange == "optimizer", "set grad_exchange = 'flat' (or 'auto')"),
                 (self.compression != "none", "local steps send no gradients to compress: set "
                                              "compression = 'none'")]
        for bad, fix in fixes:
            if bad:
                raise ConfigError(f"local_sgd_period = {period} cannot run with this config: "
                                  f"{fix}, or local_sgd_period = 0")
        if self.local_sgd_start_epoch >= self.epochs:
            raise ConfigError(f"local_sgd_start_epoch = {self.local_sgd_start_epoch} is not "
                              f"below epochs = {self.epochs}: local SGD would never start; "
                              f"use 0..{self.epochs - 1}")

    def _check_elastic(self) -> None:
        lo, hi = self.min_ranks, self.max_ranks
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"min_ranks = {lo} is more than max_ranks = {hi}: set min_ranks "
                              f"<= max_ranks (e.g. min_ranks = {hi})")
        if not self.elastic:
            given = [k for k, v in (("min_ranks", lo), ("max_ranks", hi)) if v is not None]
            if given:
                raise ConfigError(f"{given[0]} is set but elastic is off: set elastic = true "
                                  f"(--elastic) or drop {given[0]}")
            return
        fixes = [(self.mode == "async", "the parameter server admits and loses workers "
                                        "without it: set mode = 'sync'"),
                 (self.allreduce in ("mpi", "local"), "elastic runs on Horovod's elastic API; "
                  "the mpi4py fallback cannot change its world size: set allreduce = 'horovod'"),
                 (self.reduction == "adasum", "set reduction = 'average'"),
                 (self.tf_loop == "fit", "set tf_loop = 'custom'"),
                 (self.grad_exchange == "optimizer", "set grad_exchange = 'flat' (or 'auto')"),
                 (self.local_sgd_period > 0, "set local_sgd_period = 0"),
                 (self.backward_passes_per_step > 1, "set backward_passes_per_step = 1"),
                 (self.compression != "none", "a compressor is built for the world size "
                  "at its start, and a resize changes it: set compression = 'none'")]
        for bad, fix in fixes:
            if bad:
                raise ConfigError(f"elastic = true cannot run with this config: {fix}, or "
                                  "elastic = false")

    @property
    def exchange(self) -> str:
        """The Horovod gradient exchange that runs: ``grad_exchange`` with ``auto`` resolved."""
        if self.grad_exchange != "auto":
            return self.grad_exchange
        return "optimizer" if self.reduction == "adasum" or self.tf_loop == "fit" else "flat"

    def check_framework_options(self) -> None:
        """Options of one framework set for the other."""
        if self.tf_loop == "fit" and self.framework != "tensorflow":
            raise ConfigError("tf_loop = 'fit' needs framework = 'tensorflow'")
        if self.keras == "legacy" and self.framework != "tensorflow":
            raise ConfigError("keras = 'legacy' needs framework = 'tensorflow'")

    # --- world-size dependent checks, done once the world is known ---
    def per_rank_batch(self, workers: int) -> int:
        """Batch per rank for ``workers`` data-parallel ranks; raises ConfigError if impossible."""
        if self.global_batch_size is None:
            return self.batch_size
        if self.global_batch_size < workers:
            raise ConfigError(f"global_batch_size = {self.global_batch_size} is smaller than the "
                              f"{workers} ranks that share it: use at least {workers}, or fewer "
                              "ranks")
        if self.global_batch_size % workers:
            raise ConfigError(f"global_batch_size = {self.global_batch_size} does not divide by "
                              f"{workers} ranks: use a multiple of {workers}, e.g. "
                              f"{(self.global_batch_size // workers + 1) * workers}")
        return self.global_batch_size // workers

    def default_run_name(self, world_size: int, task_name: str | None = None) -> str:
        """``task_name``: a user's task (the built-in models are named by model and data)."""
        mode = self.mode if self.mode == "sync" else f"ps-{self.ps_consistency}"
        what = task_name or f"{self.model}-{self.dataset}"
        # an elastic run's world size changes; its ranks (joiners too) share one folder
        ranks = "elastic" if self.elastic else f"np{world_size}"
        return f"{self.framework}-{what}-{mode}-{ranks}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # --- loading ---
    @classmethod
    def load(cls, path: str | Path | None = None,
             overrides: dict[str, Any] | None = None) -> "RunConfig":
        """Build from an optional TOML file, then apply ``overrides`` (e.g. CLI flags)."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_toml(path))
        values.update(overrides or {})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        check_known_keys(cls, values, source, "harness train --help")
        return cls(**values)


def _plain_folder_name(name: str) -> bool:
    """One path component that names a new folder inside out_dir: nothing that climbs out of
    it (``..``, ``/``), names out_dir itself (``.``, empty) or cannot be a file name (NUL)."""
    return bool(name.strip()) and name not in (".", "..") and \
        not any(c in name for c in ("/", "\\", "\0"))


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML run config; tables are rejected with the key to move."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist: check the path given to "
                          "--config")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {str(p)!r}: [{key}] is a table, but run configs "
                              "are flat: write its keys at the top level")
    source = f"config file {str(p)!r}"
    check_known_keys(RunConfig, data, source, "harness train --help")
    try:                           # each value on its own: the file is named with its error
        check_values(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return data


def check_known_keys(cls: type, values: dict[str, Any], source: str, help_cmd: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else \
                f" Run `{help_cmd}` for the valid keys."
            raise ConfigError(f"unknown key {key!r} in {source}.{hint}")


def check_values(cls: type, values: dict[str, Any]) -> None:
    """Type-check and range-check each of ``values`` (known keys of ``cls``) on its own; what
    depends on several keys is checked when the dataclass is built."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        _check_range(fields[key], _coerce(cls, fields[key], value))


def validate_fields(obj: Any) -> None:
    """Type-check and range-check every field of a dataclass built with ``option()``."""
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(type(obj), f, getattr(obj, f.name)))
    for f in dataclasses.fields(obj):
        _check_range(f, getattr(obj, f.name))


def _base_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as ``int | None``."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _coerce(cls: type, f: dataclasses.Field, value: Any) -> Any:
    typ, optional = _base_type(cls, f)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{f.name} cannot be empty: give a {typ.__name__}")
    if typ is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{f.name} = {value!r} must be a list of strings")
        return list(value)
    ok = (isinstance(value, typ) and not (typ is int and isinstance(value, bool))) or \
        (typ is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{f.name} = {value!r} has the wrong type: expected "
                          f"{typ.__name__}{' or nothing' if optional else ''}, got "
                          f"{type(value).__name__}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"{f.name} = {value!r} is not a finite number: give a real value")
    return float(value) if typ is float else value


def _check_range(f: dataclasses.Field, value: Any) -> None:
    if value is None or not f.metadata:
        return
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        close = difflib.get_close_matches(str(value), m["choices"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{f.name} = {value!r} is not one of "
                          f"{', '.join(map(repr, m['choices']))}{hint}")
    lo, hi = m.get("minimum"), m.get("maximum")
    if lo is not None and (value < lo or (m.get("exclusive_min") and value == lo)):
        bound = f"greater than {lo}" if m.get("exclusive_min") else f"at least {lo}"
        raise ConfigError(f"{f.name} = {value!r} is out of range: it must be {bound}")
    if hi is not None and value > hi:
        raise ConfigError(f"{f.name} = {value!r} is out of range: it must be at most {hi}")


# --- CLI flags derived from the fields ---------------------------------------------------------

def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, title: str,
                            flag_names: dict[str, list[str]] | None = None) -> None:
    """Add one ``--flag`` per field of ``cls``. Unset flags stay out of the parsed namespace."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            continue
        typ, _ = _base_type(cls, f)
        flags = (flag_names or {}).get(f.name) or ["--" + f.name.replace("_", "-")]
        default = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory()  # type: ignore[operator]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata['help']} (default: {default!r})"}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typ is list:
            kwargs["type"] = lambda s: [v for v in s.split(",") if v]
            kwargs["metavar"] = "A,B"
        else:
            # choices are shown but checked by the dataclass, whose message says more
            kwargs["type"] = typ
            choices = f.metadata.get("choices")
            kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else typ.__name__.upper()
        group.add_argument(*flags, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, RunConfig, "run configuration (each also a TOML key)")


def fields_from_namespace(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def overrides_from_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    return fields_from_namespace(RunConfig, ns)


def flag_error(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's ``message`` about a flag of ``parser`` with its fix: the closest flag to an
    unknown one, else where the flags are listed."""
    if message.startswith("unrecognized arguments:"):
        flags = [s for s in parser._option_string_actions if s.startswith("--")]
        # launch and compare pass `harness train` flags on after `--`
        passes_on = any(a.dest == "train_args" for a in parser._actions)
        train_flags = train_parser()._option_string_actions if passes_on else {}
        for token in message.partition(":")[2].split():
            name = token.partition("=")[0]
            if name in train_flags:
                return f"{message}: {name} is a `harness train` flag: put it after `--` " \
                       f"({parser.prog} [its own flags] -- {name} ...)"
            close = difflib.get_close_matches(name, flags, n=1) if token.startswith("-") else []
            if close:
                return f"{message}: did you mean {close[0]}? (`{parser.prog} --help` lists " \
                       "the flags)"
    return f"{message}: `{parser.prog} --help` lists the flags and their values"


class HarnessParser(argparse.ArgumentParser):
    """A parser whose errors are one line with the fix (argparse prints its usage first)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {flag_error(self, message)}", file=sys.stderr)
        sys.exit(2)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):   # argparse would print usage and exit 2
        raise ConfigError(f"train arguments: {flag_error(self, message)}")


def train_parser(parser: argparse.ArgumentParser | None = None,
                 prog: str = "harness train") -> argparse.ArgumentParser:
    """``harness train``'s arguments: --config plus one flag per RunConfig field. Made here
    (``parser`` None), it raises ConfigError on a bad flag; ``prog`` other than harness train
    (a user's script) also answers ``--help``."""
    parser = parser or _RaisingParser(prog=prog, add_help=prog != "harness train")
    # no abbreviations: horovodrun hands the program's flags to its own argparse first, where
    # --stall would abbreviate two of its options and fail after the check here had passed
    parser.allow_abbrev = False
    parser.add_argument("--config", metavar="TOML", action=_OneConfig,
                        help="run config file; flags override its keys")
    add_config_arguments(parser)
    return parser


class _OneConfig(argparse.Action):
    """--config once: a second would replace the first without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"--config given twice ({getattr(namespace, self.dest)} and {values}): "
                         "one run reads one config file; merge them, or give the other's keys "
                         "as flags")
        setattr(namespace, self.dest, values)


def parse_train_args(argv: list[str]) -> RunConfig:
    """Validate ``harness train`` arguments without running anything."""
    ns = train_parser().parse_args(argv)
    return RunConfig.load(ns.config, overrides_from_namespace(ns))
