"""Users' own model, data and loss (issue 14): the task API, its examples, and everything the
harness does (launchers, exact resume, the parameter server, reliability, compare) for a task
that is not a built-in model.

The unit tests here import no framework: task files that fail to load are refused before one
is imported. The others run real processes, as a user would start them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, REPO, checkpoint_weights, harness, latest_checkpoint, launch, \
    needs_horovod, needs_mpi, read_jsonl, run, summary
from harness.data import Data, MapSplit, Sharder
from harness.errors import CheckpointError, ConfigError, DataError
from harness.task import Task, TaskError, Tasks

TORCH_EXAMPLE = REPO / "examples" / "torch_own_model.py"
KERAS_EXAMPLE = REPO / "examples" / "keras_own_model.py"
COMPARE_EXAMPLE = REPO / "examples" / "compare_own_model.py"


def one_error_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if "harness: error" in line]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# --- unit: loading a task, data, the API's own checks ----------------------------------------

NO_FRAMEWORK_TASKS = '''
    import numpy as np
    import harness

    x = np.zeros((8, 3), np.float32)
    data = harness.Data(train=(x, np.zeros(8, np.float32)), test=(x, np.zeros(8, np.float32)))
    mine = harness.Task(framework="torch", name="mine", model=lambda: None,
                        loss=lambda out, y: out, data=data)
    keras_only = harness.Tasks(tensorflow=harness.Task(framework="tensorflow", name="k",
                               model=lambda: None, loss=lambda out, y: out, data=data))
    number = 42
'''


@pytest.mark.parametrize("label, flags, expected", [
    ("missing.py:task", [], "task file 'missing.py' (from --task missing.py:task) does not exist"),
    ("TASKS", [], "must be PATH.py:NAME"),
    ("TASKS:nothing", [], "does not define 'nothing': it defines mine, keras_only"),
    ("TASKS:number", [], "is a int, not a harness Task"),
    ("TASKS:keras_only", ["--framework", "torch"], "has no torch version (it has tensorflow)"),
    ("TASKS:mine", ["--framework", "tensorflow"], "is a torch task, but framework = "
                                                  "'tensorflow': drop --framework"),
    ("no_such_package.mod:task", [], "task module 'no_such_package.mod'"),
])
def test_a_task_that_cannot_be_loaded_is_one_line_and_nothing_is_written(tmp_path, label, flags,
                                                                         expected):
    tasks = write(tmp_path, "tasks.py", NO_FRAMEWORK_TASKS)
    out = tmp_path / "out"
    p = run(harness("train", "--task", label.replace("TASKS", str(tasks)), *flags,
                    "--out-dir", out), timeout=60)
    assert expected in one_error_line(p)
    assert not out.exists()


def test_the_task_api_refuses_what_cannot_work():
    ok = {"framework": "torch", "model": lambda: None, "loss": lambda o, y: o, "data": None}
    for bad, message in [({"framework": "jax"}, "is not one of torch, tensorflow"),
                         ({"name": "a b"}, "must be letters"),
                         ({"model": 3}, "model = 3 is not callable"),
                         ({"metrics": {"loss": lambda o, y: o}}, "has the name of the loss"),
                         ({"defaults": {"framework": "torch"}}, "defaults cannot set")]:
        with pytest.raises(TaskError, match=message):
            Task(**{**ok, **bad})
    with pytest.raises(TaskError, match="needs a Task with framework='tensorflow'"):
        Tasks(tensorflow=Task(**ok))


class Samples:
    """Map-style: sample i is (i repeated in a (2,) vector, i) unless told otherwise."""

    def __init__(self, n: int, odd: int | None = None) -> None:
        self.n, self.odd = n, odd

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        shape = 3 if i == self.odd else 2
        return np.full(shape, i, np.float64), np.int64(i)


def test_map_style_data_is_sharded_by_rank_like_arrays():
    data = Data(train=Samples(40), test=Samples(8))
    assert data.input_shape == (2,) and len(data.train) == 40
    for epoch in range(2):
        ranks = [Sharder(40, 4, r, 2, seed=3, shuffle=True) for r in range(2)]
        batches = [data.train.batch(s.indices(epoch, 1)) for s in ranks]
        whole = Sharder(40, 8, 0, 1, seed=3, shuffle=True).indices(epoch, 1)
        ys = np.concatenate([y for _, y in batches])
        assert ys.tolist() == list(whole)                 # np=2 sees the samples of np=1
        x, y = batches[0]
        assert x.dtype == np.float32 and x.shape == (4, 2) and (x[:, 0] == y).all()


def test_a_data_loader_gives_its_dataset_to_the_harnesss_sampler():
    class Loader:                      # what a torch DataLoader looks like to Data()
        def __init__(self, dataset):
            self.dataset, self.batch_size = dataset, 7

        def __iter__(self):
            raise AssertionError("the harness samples the dataset itself")

    data = Data(train=Loader(Samples(40)), test=Loader(Samples(8)))
    x, y = data.train.batch(np.array([5, 2]))
    assert y.tolist() == [5, 2] and x.shape == (2, 2) and len(data.test) == 8


def test_map_style_samples_of_another_shape_are_refused_with_their_index():
    with pytest.raises(DataError, match=r"data train\[7\] has x of shape \(3,\), sample 0 of "
                                        r"\(2,\)"):
        Data(train=Samples(20, odd=7), test=Samples(4))
    late = MapSplit(Samples(MapSplit.CHECKED + 10, odd=MapSplit.CHECKED + 5), "big")
    with pytest.raises(DataError, match=rf"big\[{MapSplit.CHECKED + 5}\] has x of shape"):
        late.batch(np.arange(MapSplit.CHECKED, MapSplit.CHECKED + 8))


def test_array_data_must_be_numeric_finite_and_paired():
    x = np.zeros((4, 2))
    with pytest.raises(DataError, match="need the same number of samples"):
        Data(train=(x, np.zeros(3)), test=(x, np.zeros(4)))
    with pytest.raises(DataError, match="holds NaN/Inf"):
        Data(train=(np.full((4, 2), np.nan), np.zeros(4)), test=(x, np.zeros(4)))
    with pytest.raises(DataError, match="train samples have shape"):
        Data(train=(x, np.zeros(4)), test=(np.zeros((4, 3)), np.zeros(4)))
    tokens = Data(train=(np.arange(8).reshape(4, 2), np.zeros(4)),
                  test=(np.arange(8).reshape(4, 2), np.zeros(4)))
    xb, yb = tokens.train.batch(slice(0, 2))
    assert xb.dtype == np.int64 and yb.dtype == np.float32     # token ids stay integers


def tiny_task(framework: str, **kw) -> Task:
    x = np.zeros((8, 3), np.float32)
    return Task(framework=framework, name="tiny", model=lambda: None, loss=lambda o, y: o,
                data=Data(train=(x, np.zeros(8)), test=(x, np.zeros(8))), **kw)


def test_a_tasks_framework_is_the_runs_and_its_options_follow_it():
    from harness.task import configure

    cfg, _ = configure(tiny_task("tensorflow"), {"tf_loop": "fit"}, "harness.run(task)")
    assert cfg.framework == "tensorflow" and cfg.tf_loop == "fit" and cfg.task is None
    cfg, _ = configure(tiny_task("tensorflow", defaults={"keras": "legacy", "lr": 0.2}),
                       {"lr": 0.3}, "harness.run(task)")
    assert (cfg.keras, cfg.lr) == ("legacy", 0.3)          # flags win over the task's defaults
    with pytest.raises(ConfigError, match="tf_loop = 'fit' needs framework = 'tensorflow'"):
        configure(tiny_task("torch"), {"tf_loop": "fit"}, "harness.run(task)")


@pytest.mark.parametrize("name", ["lr", "step", "samples", "kind", "my metric"])
def test_metric_names_cannot_shadow_what_the_harness_records(name):
    with pytest.raises(TaskError, match="metric"):
        tiny_task("torch", metrics={name: lambda o, y: o})


def test_the_test_split_must_have_the_train_splits_dtypes():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(DataError, match="train y is int64 of sample shape"):
        Data(train=(x, np.zeros(4, np.int64)), test=(x, np.zeros(4, np.int32)))


def test_a_checkpoint_of_another_layout_is_refused():
    from harness.checkpoint import Checkpoint
    from harness.driver import check_layout

    old = Checkpoint({"position": {}}, {}, path=Path("ckpt-1.npz"))
    check_layout(old, "abc", "torch")                    # torch names and order did not change
    with pytest.raises(CheckpointError, match="before checkpoints held Keras' own"):
        check_layout(old, "abc", "tensorflow")
    other = Checkpoint({"layout": "xyz"}, {}, path=Path("ckpt-1.npz"))
    with pytest.raises(CheckpointError, match="another model's parameters"):
        check_layout(other, "abc", "torch")
    check_layout(Checkpoint({"layout": "abc"}, {}), "abc", "tensorflow")


def test_nan_faults_need_inputs_that_can_hold_nan():
    from harness.faults import FaultInjector

    with pytest.raises(ConfigError, match="integers cannot hold NaN"):
        FaultInjector(0, spec="nan@0:1").before_step(1, np.zeros((2, 3), np.int64))


def test_a_slow_fault_waits_before_each_step_from_its_step_until_released(tmp_path, monkeypatch):
    from harness import faults

    naps = []
    monkeypatch.setattr(faults.time, "sleep", naps.append)
    monkeypatch.setenv("HARNESS_FAULT_RELEASE", str(tmp_path / "go"))
    slow = faults.FaultInjector(1, spec="slow@1:3,raise@1:9")
    other = faults.FaultInjector(0, spec="slow@1:3")
    for step in range(1, 6):
        slow.before_step(step, np.zeros(2))
        other.before_step(step, np.zeros(2))
    assert naps == [faults.SLOW_S] * 3                   # rank 1, steps 3, 4, 5
    (tmp_path / "go").touch()
    for step in range(6, 9):
        slow.before_step(step, np.zeros(2))
    assert len(naps) == 3
    with pytest.raises(RuntimeError, match="raises at step 9"):   # other faults still fire
        slow.before_step(9, np.zeros(2))
    monkeypatch.delenv("HARNESS_FAULT_RELEASE")                  # unset: slow to the end
    both = faults.FaultInjector(1, spec="slow@1:3,nan@1:3")      # the same step: both act
    assert np.isnan(both.before_step(3, np.zeros(2))).all() and len(naps) == 4


# --- the examples, as documented --------------------------------------------------------------

def epoch_losses(run_dir: Path) -> list[float]:
    return [r["train_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]


def assert_regression_run(run_dir: Path, workers: int) -> dict:
    """A normal run folder whose loss went down, reported as MSE with the task's MAE."""
    for f in ("config.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / f).is_file(), f
    assert list((run_dir / "checkpoints").glob("ckpt-*.npz"))
    s = summary(run_dir)
    assert s["loss_name"] == "mse" and s["metrics"] == ["mae"] and "final_eval_acc" not in s
    assert s["world_size"] == workers and s["ranks_consistent"] is True
    losses = epoch_losses(run_dir)
    assert losses[-1] < 0.8 * losses[0], losses
    assert s["final_eval_mae"] > 0 and s["final_eval_loss"] < 1.0     # a standardised target
    model = json.loads((run_dir / "config.json").read_text())["model"]
    assert model["name"] == "diabetes_mlp" and model["loss"] == "mse"
    return s


@needs_horovod
@pytest.mark.mpi
def test_torch_example_runs_as_a_horovodrun_script(results):
    p = run(["horovodrun", "-np", 2, PY, TORCH_EXAMPLE, "--epochs", 4, "--out-dir", results],
            timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert_regression_run(results / "torch-diabetes_mlp-sync-np2", 2)


@needs_horovod
@pytest.mark.mpi
def test_keras_example_runs_through_harness_train_task_with_model_fit(results):
    """Its custom-loop runs: the compare and sequence tests; here model.fit trains it."""
    p = run(launch("horovodrun", 2, "--task", KERAS_EXAMPLE.relative_to(REPO).as_posix() +
                   ":task", "--tf-loop", "fit", "--epochs", 4, "--out-dir", results),
            timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    s = assert_regression_run(results / "tensorflow-diabetes_mlp-sync-np2", 2)
    cfg = json.loads((results / "tensorflow-diabetes_mlp-sync-np2" / "config.json").read_text())
    assert cfg["config"]["framework"] == "tensorflow"        # the task's framework
    assert cfg["config"]["tf_loop"] == "fit"
    assert cfg["config"]["lr"] == 0.01 and cfg["config"]["batch_size"] == 16   # its defaults
    assert s["steps"] == 4 * (352 // 32)


@needs_horovod
@pytest.mark.mpi
def test_compare_of_a_users_two_implementations_checks_their_fidelity(results):
    out = results / "cmp"
    p = run([PY, COMPARE_EXAMPLE, "--np", "2", "--out-dir", out, "--", "--epochs", 3],
            timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    assert "final mse" in header and "final acc" not in header
    fidelity = report[report.index("## Fidelity"):].split("##")[1]
    assert "same initial weights" in fidelity
    line = next(x for x in fidelity.splitlines() if x.startswith("- 2 worker(s)"))
    assert line.endswith("agree"), line
    firsts = [read_jsonl(out / f"{fw}-sync-np2" / "metrics.jsonl") for fw in
              ("torch", "tensorflow")]
    step1 = [next(r["loss"] for r in recs if r["kind"] == "step") for recs in firsts]
    assert abs(step1[0] - step1[1]) <= 1e-5


# --- what must keep working with a user's task ------------------------------------------------

def torch_task_args(*extra) -> list:
    return ["--task", f"{TORCH_EXAMPLE}:task", "--agree-every", 1, "--log-every", 1000, *extra]


@needs_horovod
@needs_mpi
@pytest.mark.mpi
def test_a_users_task_resumes_exactly_after_preemption(results):
    common = torch_task_args("--epochs", 3, "--out-dir", results)
    ref = run(launch("mpirun", 2, *common, "--run-name", "ref"), timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    first = run(launch("mpirun", 2, *common, "--run-name", "cut"), timeout=300,
                env={"HARNESS_FAULT": "sigterm@1:13"})
    assert first.returncode == 75, first.stderr[-3000:]
    again = run(launch("mpirun", 2, *common, "--run-name", "cut"), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    a = checkpoint_weights(latest_checkpoint(results / "ref"))
    b = checkpoint_weights(latest_checkpoint(results / "cut"))
    assert set(a) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    for k in a:                                   # the framework's own parameter names
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert summary(results / "cut")["steps"] == summary(results / "ref")["steps"]


@needs_mpi
@pytest.mark.mpi
def test_a_users_task_trains_on_the_mpi_fallback_and_the_parameter_server(results):
    p = run(launch("mpirun", 2, *torch_task_args("--allreduce", "mpi", "--epochs", 4,
                                                 "--out-dir", results)), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_regression_run(results / "torch-diabetes_mlp-sync-np2", 2)
    p = run(launch("mpirun", 3, *torch_task_args("--mode", "async", "--epochs", 4,
                                                 "--out-dir", results)), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = results / "torch-diabetes_mlp-ps-async-np3"
    s = summary(run_dir)
    assert s["loss_name"] == "mse" and s["final_eval_mae"] > 0 and s["final_eval_loss"] < 1.0
    pushes = [r["mae"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert len(pushes) == s["updates"] and np.mean(pushes[-10:]) < np.mean(pushes[:10])


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("fault, flags, expect", [
    ("nan@1:4", ["--nan-policy", "skip"], "skipped"),
    ("desync@1:6", [], "ranks ended with different weights"),
    ("hang@1:6", ["--stall-timeout-s", 4], "rank 1"),
])
def test_reliability_guards_hold_for_a_users_task(results, fault, flags, expect):
    p = run(launch("mpirun", 2, *torch_task_args("--allreduce", "mpi", "--epochs", 1,
                                                 "--out-dir", results, *flags)),
            timeout=200, env={"HARNESS_FAULT": fault})
    run_dir = results / "torch-diabetes_mlp-sync-np2"
    if expect == "skipped":
        assert p.returncode == 0, p.stderr[-3000:]
        s = summary(run_dir)
        assert s["skipped_steps"] == 1 and s["ranks_consistent"] is True
    else:
        assert p.returncode not in (0, 2, 75), p.stderr[-3000:]
        assert expect in p.stderr, p.stderr[-3000:]
        assert not (run_dir / "summary.json").exists() or expect.startswith("ranks")


# --- a task that does not fit, or whose code raises -------------------------------------------

TORCH_TASK = '''
    import numpy as np
    import torch
    import harness

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 5)).astype(np.float32), rng.standard_normal(64)


    class Mixed:
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return (x[i] if i != 9 else np.zeros(6, np.float32)), y[i]


    def model():
        {model}


    def loss(out, y):
        {loss}


    task = harness.Task(framework="torch", name="bad", model=model, loss=loss, metrics={metrics},
                        data=lambda: harness.Data(train={train}, test=(x, y)))
'''
FITS = {"model": "return torch.nn.Linear(5, 1)", "loss": "return ((out[:, 0] - y) ** 2).mean()",
        "train": "(x, y)", "metrics": "{}"}


@pytest.mark.framework
@pytest.mark.parametrize("case, change, expected", [
    ("wrong output shape", {"model": "return torch.nn.Sequential(torch.nn.Linear(5, 8), "
                                     "torch.nn.Unflatten(1, (4, 2)))",
                            "loss": "return torch.nn.functional.mse_loss(out, y)"},
     "task 'bad': loss(model(x), y) failed on a batch of 32 training samples (x (32, 5) float32, "
     "model output (32, 4, 2), y (32,) float32)"),
    ("layers do not fit", {"model": "return torch.nn.Sequential(torch.nn.Linear(5, 8), "
                                    "torch.nn.Linear(6, 1))"},
     "task 'bad': model(x) failed on a batch of 32 training samples (x (32, 5) float32, y (32,) "
     "float32): RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x8 and 6x1). Make "
     "the model's layers fit each other and the data's x"),
    ("the user's forward", {"model": "return type('M', (torch.nn.Linear,), {'forward': "
                                     "lambda self, x: x @ self.weight})(5, 3)"},
     "RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x5 and 3x5) (at bad.py:19 in "
     "<lambda>). Make the model's layers fit each other and the data's x"),
    ("loss not a scalar", {"loss": "return (out[:, 0] - y) ** 2"},
     "task 'bad': loss(model(x), y) returned shape (32,) for a batch of 32, not a scalar"),
    ("samples differ", {"train": "Mixed()"}, "data train[9] has x of shape (6,), sample 0 of (5,)"),
    ("not a module", {"model": "return 'a model'"},
     "task 'bad': model() returned str, not a torch.nn.Module"),
    ("loss a Python number", {"loss": "return torch.nn.functional.mse_loss(out[:, 0], y).item()"},
     "task 'bad': loss(model(x), y) returned float"),
    ("acc a count", {"metrics": "{'acc': lambda out, y: (out[:, 0] == out[:, 0]).sum()}"},
     "task 'bad': metric 'acc' returned 32 for a batch of 32: acc is the fraction correct"),
])
def test_a_task_that_does_not_fit_is_one_line_and_nothing_is_written(tmp_path, case, change,
                                                                       expected):
    task = write(tmp_path, "bad.py", TORCH_TASK.format(**{**FITS, **change}))
    out = tmp_path / "out"
    p = run(harness("train", "--task", f"{task}:task", "--allreduce", "local", "--out-dir", out),
            timeout=120)
    assert expected in one_error_line(p)
    assert not out.exists()


@pytest.mark.framework
@pytest.mark.parametrize("change, error", [
    ({"model": "raise RuntimeError('my model is broken')"}, "RuntimeError: my model is broken"),
    # a message that only mentions a rank is the user's own, not a shape misfit
    ({"loss": "raise ValueError('the rank one loss is not done')"},
     "ValueError: the rank one loss is not done"),
])
def test_a_task_whose_own_code_raises_shows_its_traceback_and_rank(tmp_path, change, error):
    task = write(tmp_path, "raises.py", TORCH_TASK.format(**{**FITS, **change}))
    out = tmp_path / "out"
    p = run(harness("train", "--task", f"{task}:task", "--allreduce", "local", "--out-dir", out),
            timeout=120)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "harness: unexpected error on rank 0" in p.stderr
    assert "Traceback" in p.stderr and f'File "{task}"' in p.stderr
    assert error in p.stderr
    assert not out.exists()


# --- sequence models: token inputs, a per-token loss and metric -------------------------------

TOKENS = '''
    import numpy as np
    import harness

    V, T = 16, 12


    def data():
        """Next-token prediction where the next token is always (token + 3) mod V."""
        rng = np.random.default_rng(0)
        start = rng.integers(0, V, (600, 1))
        seq = (start + 3 * np.arange(T + 1)) % V
        x, y = seq[:, :-1].astype(np.int64), seq[:, 1:].astype(np.int64)
        return harness.Data(train=(x[:500], y[:500]), test=(x[500:], y[500:]), name="tokens")
'''
TORCH_TOKENS = TOKENS + '''
    import torch
    from torch import nn


    def model():
        return nn.Sequential(nn.Embedding(V, 32), nn.Linear(32, V))


    def loss(out, y):                                  # out (B, T, V), y (B, T)
        return nn.functional.cross_entropy(out.reshape(-1, V), y.reshape(-1))


    def token_acc(out, y):
        return (out.argmax(-1) == y).float().mean()


    task = harness.Task(framework="torch", name="tokens", model=model, loss=loss,
                        loss_name="token_cross_entropy", metrics={"token_acc": token_acc},
                        data=data)
'''
KERAS_TOKENS = TOKENS + '''
    import keras
    import tensorflow as tf


    built = []


    def model():
        inputs = keras.Input(shape=(T,), dtype="int64")
        dense = keras.layers.Dense(V, activity_regularizer=keras.regularizers.L2(1e-6))
        built.append(keras.Model(inputs, dense(keras.layers.Embedding(V, 32)(inputs))))
        return built[-1]


    def loss(out, y):
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int64),
                                                            logits=out)
        if tf.reduce_any(tf.math.is_nan(ce)):     # Python's if on a tensor: needs autograph
            ce = tf.zeros_like(ce)
        # the model's penalty from this call: a tensor of the graph that calls the loss
        return tf.reduce_mean(ce) + sum(built[-1].losses)


    def token_acc(out, y):
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out, -1), tf.cast(y, tf.int64)),
                                      tf.float32))


    task = harness.Task(framework="tensorflow", name="tokens", model=model, loss=loss,
                        loss_name="token_cross_entropy", metrics={"token_acc": token_acc},
                        data=data)
'''


@pytest.mark.framework
@pytest.mark.parametrize("fw, body", [("torch", TORCH_TOKENS), ("tensorflow", KERAS_TOKENS)])
def test_a_sequence_task_trains_on_token_ids_with_its_own_metric_names(tmp_path, fw, body):
    task = write(tmp_path, "tokens.py", body)
    out = tmp_path / "out"
    p = run(harness("train", "--task", f"{task}:task", "--allreduce", "local", "--epochs", 3,
                    "--lr", 0.5, "--out-dir", out), timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = out / f"{fw}-tokens-sync-np1"
    s = summary(run_dir)
    assert s["loss_name"] == "token_cross_entropy" and s["metrics"] == ["token_acc"]
    assert s["final_eval_token_acc"] > 0.9 and "final_eval_acc" not in s
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert steps[-1]["token_acc"] > steps[0]["token_acc"]
    assert "token_acc" in p.stderr                  # rank 0's progress names the metric


# --- exact resume of a model that draws random numbers (dropout) -------------------------------

NOISY = '''
    import os
    import random

    import numpy as np
    import harness

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8) / np.sqrt(8)).astype(np.float32)
    data = harness.Data(train=(x[:80], y[:80]), test=(x[80:], y[80:]))


    RANK = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


    def jitter():
        """A task's own noise from NumPy's and Python's global generators (augmentation, say);
        each rank draws a different number of values, so the ranks' generators part ways."""
        return 1.0 + np.random.normal(0, 0.1, RANK + 1).sum() + random.gauss(0, 0.1)
'''
TORCH_DROPOUT = NOISY + '''
    import torch
    from torch import nn


    def model():
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))


    def loss(out, y):
        return nn.functional.mse_loss(out[:, 0], y) * jitter()


    task = harness.Task(framework="torch", name="dropout", model=model, loss=loss, data=data)
'''
KERAS_DROPOUT = NOISY + '''
    import keras
    import tensorflow as tf


    def model():
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
                                 keras.layers.Dropout(0.5), keras.layers.Dense(1)])


    def loss(out, y):
        noise = tf.reshape(tf.numpy_function(lambda: np.float32(jitter()), [], tf.float32,
                                             stateful=True), [])
        return tf.reduce_mean(tf.square(out[:, 0] - y)) * noise


    task = harness.Task(framework="tensorflow", name="dropout", model=model, loss=loss,
                        data=data)
'''


def preempt_and_resume(tmp_path, body: str, launcher: list, flags: list, stop: str) -> None:
    """A run stopped at a checkpoint (SIGTERM at ``stop``) and resumed ends with the weights
    of one that ran through: every random draw after the resume is the one it would have been."""
    task = write(tmp_path, "noisy.py", body)
    common = [*flags, "--task", f"{task}:task", "--epochs", 4, "--batch-size", 8, "--lr", 0.01,
              "--agree-every", 1, "--log-every", 1000, "--out-dir", tmp_path / "out"]
    run([*launcher, *common, "--run-name", "ref"], timeout=300, check=True)
    cut = run([*launcher, *common, "--run-name", "cut"], timeout=300,
              env={"HARNESS_FAULT": f"sigterm@{stop}"})
    assert cut.returncode == 75, cut.stderr[-3000:]
    assert "ckpt-000000013" in "".join(p.name for p in (tmp_path / "out" / "cut" /
                                                        "checkpoints").iterdir())
    run([*launcher, *common, "--run-name", "cut"], timeout=300, check=True)
    a = checkpoint_weights(latest_checkpoint(tmp_path / "out" / "ref"))
    b = checkpoint_weights(latest_checkpoint(tmp_path / "out" / "cut"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.framework
@pytest.mark.parametrize("body, flags", [
    (TORCH_DROPOUT, ["--allreduce", "local"]), (KERAS_DROPOUT, ["--allreduce", "local"]),
    pytest.param(KERAS_DROPOUT, ["--tf-loop", "fit"], marks=needs_horovod)],
    ids=["torch", "tensorflow", "tensorflow-fit"])
def test_a_task_with_dropout_resumes_exactly(tmp_path, body, flags):
    preempt_and_resume(tmp_path, body, harness("train"), flags, "0:13")


@needs_mpi
@pytest.mark.mpi
@needs_horovod
def test_each_rank_resumes_its_own_random_draws(tmp_path):
    """Two ranks (Horovod's gather and broadcast of the rows): each rank's generators are
    checkpointed in its own row, and each draws a different number of values."""
    preempt_and_resume(tmp_path, TORCH_DROPOUT, launch("mpirun", 2), [], "1:13")


@pytest.mark.framework
def test_a_keras_task_whose_loss_is_a_numpy_number_is_one_line(tmp_path):
    task = write(tmp_path, "numpy_loss.py", NOISY + '''
    import keras
    import tensorflow as tf


    def model():
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])


    task = harness.Task(framework="tensorflow", name="np_loss", model=model, data=data,
                        loss=lambda out, y: tf.reduce_mean(tf.square(out[:, 0] - y)).numpy())
''')
    out = tmp_path / "out"
    p = run(harness("train", "--task", f"{task}:task", "--allreduce", "local", "--out-dir", out),
            timeout=120)
    assert "task 'np_loss': loss(model(x), y) returned float32" in one_error_line(p)
    assert "not a tf.Tensor" in p.stderr and not out.exists()
