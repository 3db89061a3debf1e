"""What a new user gets wrong, as they would type it: one line naming the bad value and the fix,
exit 2, nothing written; and what they ask for (``--help``) answered. Each case was found by
trying the harness as a new user (none of them imports a framework).
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from conftest import PY, REPO, harness, needs_horovod, run
from harness.checkpoint import Checkpoint, save
from harness.config import RunConfig
from harness.errors import CheckpointError, ConfigError

NO_FRAMEWORK_TASK = '''
    import sys
    import numpy as np
    import harness

    x = np.zeros((8, 3), np.float32)
    data = harness.Data(train=(x, np.zeros(8, np.float32)), test=(x, np.zeros(8, np.float32)))
    task = harness.Task(framework="torch", name="mine", model=lambda: None,
                        loss=lambda out, y: out, data=data)
    keras = harness.Task(framework="tensorflow", name="k", model=lambda: None,
                         loss=lambda out, y: out, data=data)
    keras_only = harness.Tasks(tensorflow=keras)
    pair = harness.Tasks(torch=task, tensorflow=keras)

    if __name__ == "__main__":
        sys.exit(harness.run(task, argv=sys.argv[1:]))
'''


def one_line(p, where: str = "stderr") -> str:
    text = getattr(p, where)
    lines = [line for line in text.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, text[-3000:])
    return lines[0]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "my_task.py"
    path.write_text(textwrap.dedent(NO_FRAMEWORK_TASK))
    return path


# --- run_name is one folder inside out_dir ---------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", ".", "..", "a/b", ""])
def test_a_run_name_that_is_not_one_folder_name_is_refused(name):
    with pytest.raises(ConfigError, match="must be one plain folder name"):
        RunConfig(run_name=name)


def test_a_run_name_that_climbs_out_of_out_dir_writes_nothing(tmp_path):
    out = tmp_path / "inner" / "results"
    p = run(harness("train", "--out-dir", out, "--run-name", "../../escaped"), timeout=60)
    assert "run_name = '../../escaped' must be one plain folder name" in one_line(p)
    assert not any(tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_ordinary_run_names_are_kept():
    for name in ("baseline", "torch-cnn-np2", "run.v2", "a b"):
        assert RunConfig(run_name=name).run_name == name


# --- flags of the command line -----------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["train", "--lr", "abc"], "harness train: error: argument --lr: invalid float value: 'abc'"),
    (["train", "--lrr", "0.1"], "unrecognized arguments: --lrr 0.1: did you mean --lr?"),
    (["train", "--epoch", "3"], "did you mean --epochs?"),
    (["launch", "--np", "two"], "argument -np/--np: invalid int value: 'two'"),
    (["compare", "--launchr", "mpirun"], "did you mean --launcher?"),
    (["train", "--hepl"], "did you mean --help?"),
    # `harness train` flags before `--`: where they go, not a launcher flag that looks alike
    (["launch", "-np", "2", "--epochs", "3"],
     "--epochs is a `harness train` flag: put it after `--` (harness launch"),
    (["compare", "--lr", "0.1"], "--lr is a `harness train` flag: put it after `--`"),
])
def test_a_bad_flag_is_one_line_with_the_fix(tmp_path, argv, expected):
    p = run(harness(*argv), timeout=60, cwd=tmp_path)
    line = one_line(p)
    assert expected in line and ("--help" in line or "after `--`" in line), line
    assert not any(tmp_path.iterdir())


def test_a_bad_flag_after_launch_dashes_names_the_closest_flag():
    p = run(harness("launch", "--dry-run", "--", "--epoch", "3"), timeout=60)
    assert "did you mean --epochs?" in one_line(p)


# --- a user's own script: harness.run(task, argv) ---------------------------------------------

def test_a_users_script_answers_help(task_file):
    p = run([PY, task_file, "--help"], timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith(f"usage: python {task_file.name}") and "--epochs" in p.stdout


def test_a_users_script_refuses_a_task_of_harness_train(task_file, tmp_path):
    out = tmp_path / "out"
    p = run([PY, task_file, "--task", "other.py:task", "--out-dir", out], timeout=60)
    line = one_line(p)
    assert "task = 'other.py:task' (--task, or the config's task key)" in line, line
    assert "harness.run(task) trains the task it is given: drop it" in line
    assert not out.exists()


@pytest.mark.parametrize("command", [["train"], ["compare", "--np", "1", "--dry-run", "--"]])
def test_a_second_config_is_refused_not_dropped(tmp_path, command):
    """Found by a new-user hunt: the last --config alone was read, the first dropped unseen."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'model = "mlp"\nout_dir = "{tmp_path / "out"}"\n')
    b.write_text("epochs = 1\n")
    p = run(harness(*command, "--config", a, f"--config={b}"), timeout=60, cwd=tmp_path)
    assert f"--config given twice ({a} and {b}): one run reads one config file" in one_line(p)
    assert not (tmp_path / "out").exists()


def test_network_interfaces_of_which_one_exists_here_are_horovodruns_to_use():
    from launchers.spec import LaunchSpec

    LaunchSpec(launcher="horovodrun", np=2, network_interfaces="lo,eth99").check_interfaces_here()


def test_harness_run_without_a_task_is_one_line(tmp_path):
    """It used to read its own label as a --task path and name --task."""
    p = run([PY, "-c", "import sys, harness; sys.exit(harness.run(None, {'out_dir': "
             f"{str(tmp_path / 'out')!r}}}))"], timeout=60)
    line = one_line(p)
    assert "harness.run(task, ...): task is None: give a Task" in line and "--task " not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("launch, train, expected", [
    (["--launcher", "mpirun", "-np", "2"], ["--allreduce", "local"],
     "allreduce = 'local' trains one process, but this launch starts 2"),
    (["--launcher", "sbatch", "-np", "4", "--nodes", "2", "--dry-run"], ["--allreduce", "local"],
     "allreduce = 'local' trains one process, but this launch starts 4"),
    (["--launcher", "horovodrun", "--controller", "gloo", "-np", "2"], ["--allreduce", "mpi"],
     "allreduce = 'mpi' reduces with mpi4py, but --controller gloo starts the ranks without MPI"),
    (["--launcher", "horovodrun", "--controller", "gloo", "-np", "2"], ["--mode", "async"],
     "mode = 'async' runs its parameter servers on MPI (mpi4py), but --controller gloo"),
    (["--launcher", "mpirun", "-np", "3"], ["--global-batch-size", "64"],
     "global_batch_size = 64 does not divide by 3 ranks: use a multiple of 3, e.g. 66"),
    (["--launcher", "mpirun", "-np", "4"], ["--mode", "async", "--ps-servers", "2",
                                            "--global-batch-size", "1"],
     "global_batch_size = 1 is smaller than the 2 ranks that share it"),
    (["--launcher", "horovodrun", "-np", "2", "--network-interfaces", "eth98,eth99"], [],
     "--network-interfaces 'eth98,eth99' gives 'eth98', 'eth99', and this machine has no such "
     "interface; it has lo"),
    (["--launcher", "horovodrun", "-np", "2", "--network-interfaces", ","], [],
     "--network-interfaces ',' gives no name, and this machine has no such interface"),
])
def test_launch_refuses_a_gradient_path_the_ranks_would_refuse(tmp_path, launch, train,
                                                                expected):
    """Once started, every rank would refuse it inside the launcher's abort notice."""
    p = run(harness("launch", *launch, "--", *train, "--out-dir", tmp_path / "out"), timeout=60)
    assert expected in one_line(p)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("train", [[], ["--allreduce", "horovod"]])
def test_launch_refuses_a_horovod_variable_the_ranks_would_refuse(tmp_path, train):
    """Found by a new-user hunt: each rank refused it inside mpirun's abort notice."""
    p = run(harness("launch", "--launcher", "mpirun", "-np", "2", "--", *train, "--out-dir",
                    tmp_path / "out"), env={"HOROVOD_FUSION_THRESHOLD": "64MB"}, timeout=60)
    assert "HOROVOD_FUSION_THRESHOLD='64MB' is not a whole number" in one_line(p)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_compare_refuses_a_runs_folder_as_its_out_dir(tmp_path, resume):
    """Found by a new-user hunt: `compare --resume --out-dir results/<run>` started a new
    comparison inside that run's folder and wrote its report there."""
    run_dir = tmp_path / "torch-sync-np2"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    p = run(harness("compare", *resume, "--out-dir", run_dir, "--dry-run", "--", "--epochs",
                    "1"), timeout=60)
    assert f"--out-dir '{run_dir}' is one run's folder (it holds metrics.jsonl)" in one_line(p)
    assert sorted(q.name for q in run_dir.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("train, expected", [
    (["--allreduce", "local"], "allreduce = 'local' trains one process, but this launch starts 2"),
    (["--mode", "async"], "--mode after --: compare sets --mode for each run itself; list modes "
                          "with --modes"),
])
def test_compare_refuses_what_it_would_fail_on_or_override_before_any_run(tmp_path, train,
                                                                          expected):
    """A path the ranks would refuse, and a flag compare sets for each run itself (it used to
    win silently over the user's), are one line before anything starts."""
    p = run(harness("compare", "--frameworks", "torch", "--np", "1,2", "--out-dir",
                    tmp_path / "out", "--", "--model", "cnn", "--epochs", "1", *train),
            timeout=120)
    assert expected in one_line(p)
    assert not (tmp_path / "out").exists()


# --- compare: every framework can train the task, before the first run -----------------------

def test_compare_refuses_a_task_of_one_framework_before_any_run(task_file, tmp_path):
    out = tmp_path / "cmp"
    p = run(harness("compare", "--np", "1", "--out-dir", out, "--",
                    "--task", f"{task_file}:task"), timeout=120)
    line = one_line(p)
    assert "--frameworks torch,tensorflow: the tensorflow runs cannot train this task " \
           "(task 'mine' is a torch task): compare --frameworks torch, or give harness.Tasks " \
           "with a tensorflow version too" in line, line
    assert not out.exists()


def test_compare_names_the_framework_a_tasks_pair_lacks(task_file, tmp_path):
    p = run(harness("compare", "--np", "1", "--out-dir", tmp_path / "cmp", "--",
                    "--task", f"{task_file}:keras_only"), timeout=120)
    assert "the torch runs cannot train this task (this task has no torch version (it has " \
           "tensorflow))" in one_line(p)


def test_compare_of_frameworks_a_task_lacks_names_the_ones_it_has(task_file, tmp_path):
    p = run(harness("compare", "--frameworks", "tensorflow", "--np", "1", "--out-dir",
                    tmp_path / "cmp", "--", "--task", f"{task_file}:task"), timeout=120)
    assert "--frameworks tensorflow: this task has no version for them (task 'mine' is a " \
           "torch task): use --frameworks torch" in one_line(p)


def test_compare_passes_on_an_option_one_framework_refuses(task_file, tmp_path):
    p = run(harness("compare", "--np", "1", "--out-dir", tmp_path / "cmp", "--",
                    "--task", f"{task_file}:pair", "--tf-loop", "fit"), timeout=120)
    assert "the torch runs: tf_loop = 'fit' needs framework = 'tensorflow'" in one_line(p)


def test_compare_reports_a_bad_task_label_as_train_would(tmp_path):
    p = run(harness("compare", "--np", "1", "--out-dir", tmp_path / "cmp", "--",
                    "--task", f"{tmp_path}/missing.py:task"), timeout=120)
    assert "does not exist: give PATH.py:NAME" in one_line(p)


# --- launcher options that name files and hosts -------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--launcher", "mpirun", "--hostfile", "no/such/hostfile"],
     "hostfile 'no/such/hostfile' does not exist"),
    (["--launcher", "horovodrun", "--python", "/no/such/python"],
     "python '/no/such/python' is not an executable on this machine"),
    (["--launcher", "mpirun", "--hosts", "node1:0"], "'node1:0' is not HOST or HOST:SLOTS"),
    (["--launcher", "horovodrun", "--hosts", "node1"], "'node1' is not HOST:SLOTS"),
    (["--launcher", "mpirun", "--hosts", "a:2,:1"], "':1' is not HOST or HOST:SLOTS"),
    (["--launcher", "mpirun", "--hosts", "a:2, b:2"], "holds spaces"),
    (["--launcher", "srun", "--hosts", "n1:0"], "srun takes its hosts from SLURM"),
    (["--launcher", "mpirun", "--hostfile", "."], "hostfile '.' is a folder"),
])
def test_launcher_files_and_hosts_are_checked_before_anything_starts(tmp_path, flags, expected):
    p = run(harness("launch", *flags, "-np", "2", "--", "--out-dir", tmp_path / "out"),
            timeout=60)
    assert expected in one_line(p)
    assert not (tmp_path / "out").exists()


def test_a_printed_command_may_name_files_of_another_machine(tmp_path):
    p = run(harness("launch", "--launcher", "mpirun", "--hostfile", "/cluster/hosts",
                    "--python", "/cluster/venv/bin/python", "--dry-run", "--", "--out-dir",
                    tmp_path / "out"), timeout=60)
    assert p.returncode == 0 and "--hostfile /cluster/hosts" in p.stdout, p.stderr


# --- messages that said the wrong thing ---------------------------------------------------------

def test_a_folder_given_as_the_checkpoint_to_resume_is_not_called_corrupt(tmp_path):
    import numpy as np

    run_dir = tmp_path / "run"
    path = save(run_dir / "checkpoints", Checkpoint({"position": {"step": 7}},
                                                    {"w": np.zeros(2, np.float32)}))
    from harness.checkpoint import load

    ps = save(run_dir / "ps", Checkpoint({"position": {"step": 9}},
                                         {"w": np.zeros(2, np.float32)}), prefix="ps-server0")
    with pytest.raises(CheckpointError, match=f"e.g. {ps}"):
        load(run_dir / "ps")
    for folder in (run_dir, run_dir / "checkpoints"):
        with pytest.raises(CheckpointError) as e:
            load(folder)
        assert "is a folder: give one checkpoint file, e.g. " + str(path) in str(e.value)
        assert "corrupt" not in str(e.value)


def test_a_task_may_be_given_data_path_for_its_own_task_function():
    import numpy as np

    from harness import Data, Task
    from harness.task import configure

    cfg = RunConfig(task="my.py:task", data_path="/data/mine.npz")
    assert cfg.data_path == "/data/mine.npz"
    x = np.zeros((4, 2), np.float32)
    mine = Task(framework="torch", model=lambda: None, loss=lambda o, y: o,
                data=Data(train=(x, x[:, 0]), test=(x, x[:, 0])))
    cfg, _ = configure(mine, {"data_path": "/data/mine.npz"}, "harness.run(task)")  # a script's
    assert cfg.data_path == "/data/mine.npz" and cfg.task is None
    with pytest.raises(ConfigError, match="is only read when dataset = 'npz'"):
        RunConfig(data_path="/data/mine.npz")


@pytest.mark.framework
def test_the_readme_torch_snippet_runs_as_written(tmp_path):
    """The README's PyTorch snippet is a whole script: copied into a file, it trains."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\nimport sys")
    script = tmp_path / "mine.py"
    script.write_text(readme[start + len("```python\n"): readme.index("```", start + 10)])
    p = run([PY, script, "--epochs", "1", "--allreduce", "local", "--out-dir", tmp_path / "out"],
            timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "out" / "torch-diabetes_mlp-sync-np1" / "summary.json").is_file()


TWO_RUNS = '''
    import json, os, sys
    sys.path.insert(0, {examples!r})
    import harness
    from torch_own_model import task

    def run(name, **keys):
        code = harness.run(task, dict(epochs=1, out_dir={out!r}, run_name=name, **keys))
        print(json.dumps([name, code, dict(os.environ) == before]), flush=True)

    before = dict(os.environ)
    run("a", allreduce="horovod", fusion_threshold_mb=8)
    run("b")                           # auto: one rank, no exchange (a's HOROVOD_* are gone)
    run("c", allreduce="horovod")      # Horovod ended MPI: one line, not MPI's abort
    run("d", allreduce="mpi")
'''


def run_script(tmp_path, template: str, launch: tuple = (), timeout: float = 240):
    """A user's script (``template`` with the examples folder and an out_dir filled in) run
    as ``[*launch, python, script]``: the process, the JSON lines it printed, its out_dir."""
    out = tmp_path / "out"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(template.format(examples=str(REPO / "examples"),
                                                      out=str(out))))
    p = run([*launch, PY, script], timeout=timeout)
    return p, [json.loads(line) for line in p.stdout.splitlines() if line.startswith("[")], out


@needs_horovod
@pytest.mark.framework
def test_runs_in_one_process_leave_no_settings_and_a_second_mpi_run_is_one_line(tmp_path):
    """harness.run twice in one process (a notebook, a sweep): the first run's exported settings
    (HOROVOD_*, threads) are gone after it, so the next `auto` run is not moved onto Horovod;
    a run that needs MPI after Horovod ended it says so in one line (exit 2, nothing
    written) instead of MPI's abort."""
    p, lines, out = run_script(tmp_path, TWO_RUNS)
    assert [line[:2] for line in lines] == [["a", 0], ["b", 0], ["c", 2], ["d", 2]], \
        (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert all(line[2] for line in lines), lines      # the environment as before each run
    b = json.loads((out / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert b["backend"]["gradient_path"] == "local"
    errors = [line for line in p.stderr.splitlines() if line.startswith("harness: error")]
    assert len(errors) == 2 and all("MPI cannot start twice in one process" in e
                                    for e in errors), p.stderr[-3000:]
    assert sorted(d.name for d in out.iterdir()) == ["a", "b"]


@pytest.mark.framework
def test_a_straggler_rank_the_job_does_not_have_is_said(tmp_path):
    """It was ignored silently: the run trained with nothing slowed. A warning, not a refusal:
    a comparison's 1-rank baseline of a straggler experiment runs with the same flags."""
    p = run(harness("train", "--model", "cnn", "--epochs", "1", "--straggler-rank", "1",
                    "--straggler-factor", "2", "--out-dir", tmp_path / "out"), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "straggler_rank = 1 is not a rank of this 1-rank job: nothing is slowed" in p.stderr


@needs_horovod
@pytest.mark.mpi
def test_a_second_auto_run_under_mpirun_after_horovod_ended_mpi_is_one_line(tmp_path):
    """Under mpirun, `auto` agrees on its path through mpi4py before any backend starts: after
    a Horovod run ended MPI in the process, that agreement aborted inside MPI."""
    mpirun = ("mpirun", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
              "--oversubscribe", "-np", "2", "-x", "PATH", "-x", "PYTHONPATH")
    p, lines, _ = run_script(tmp_path, TWO_RUNS, mpirun)
    assert [line[:2] for line in lines] == [["a", 0]] * 2, (p.stdout[-2000:], p.stderr[-3000:])
    assert p.returncode != 0                   # both ranks ran a; b stopped the job
    assert "MPI cannot start twice in one process" in p.stderr, p.stderr[-3000:]
    assert "MPI_FINALIZE" not in p.stderr, p.stderr[-3000:]


KERAS_RUNS = '''
    import json, sys
    sys.path.insert(0, {examples!r})
    import harness
    from keras_own_model import task

    for name, threads in (("a", 1), ("b", 2)):
        keys = dict(epochs=1, out_dir={out!r}, run_name=name, threads_per_rank=threads)
        print(json.dumps([name, harness.run(task, keys)]), flush=True)
'''


@pytest.mark.framework
def test_a_second_keras_run_in_one_process_says_its_threads_are_the_first_runs(tmp_path):
    """TensorFlow's thread pools cannot change once they exist: the second run warns and its
    run record holds the threads it really used (it claimed the ones it would have set)."""
    p, codes, out = run_script(tmp_path, KERAS_RUNS, timeout=300)
    assert codes == [["a", 0], ["b", 0]], (p.stdout[-2000:], p.stderr[-3000:])
    first = json.loads((out / "b" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["backend"]["settings"]["threads_per_rank"] == 1
    assert "TensorFlow started in this process with 1 compute thread(s), which cannot " \
           "change now" in p.stderr


# --- found by a second new-user hunt ----------------------------------------------------------

@pytest.mark.parametrize("train, expected", [
    (["--task", "nope.py:task"], "task file 'nope.py' (from --task nope.py:task) does not exist"),
    (["--dataset", "npz", "--data-path", "nope.npz"], "data_path 'nope.npz' does not exist"),
])
def test_launch_checks_the_task_file_and_data_before_any_rank_starts(tmp_path, train, expected):
    p = run(harness("launch", "--launcher", "mpirun", "-np", "2", "--", *train, "--out-dir",
                    tmp_path / "out"), timeout=60, cwd=tmp_path)
    assert expected in one_line(p)                 # one line: no rank (and no mpirun banner)
    assert not (tmp_path / "out").exists()


def test_files_the_ranks_read_elsewhere_are_not_checked_here(tmp_path):
    """SLURM ranks (and ranks on other hosts) read their own file systems; a task's data_path
    is its function's to read."""
    from launchers.cli import check_run_files
    from launchers.spec import LaunchSpec

    assert LaunchSpec.with_defaults(launcher="mpirun", np=2).runs_here()
    assert LaunchSpec.with_defaults(launcher="mpirun", np=2, hosts="localhost:2").runs_here()
    for given in ({"launcher": "sbatch"}, {"launcher": "srun"},
                  {"launcher": "mpirun", "hosts": "node7:2"},
                  {"launcher": "horovodrun", "hostfile": "hosts"}):
        assert not LaunchSpec.with_defaults(np=2, **given).runs_here(), given

    check_run_files(RunConfig(task="pkg.mod:task", dataset="npz", data_path="/not/here"))


def test_report_out_that_is_a_file_is_refused_before_anything_is_printed(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    p = run(harness("report", tmp_path, "--out", afile), timeout=60)
    assert "--out '" + str(afile) + "' is a file: give a folder" in one_line(p)
    assert not p.stdout and afile.read_text() == "mine"


@pytest.mark.parametrize("out, expected", [("nosuch/b.jsonl", "its folder does not exist"),
                                           (".", "is a folder")])
def test_bench_out_is_checked_before_a_benchmark_starts(tmp_path, out, expected):
    p = run(harness("bench", "allreduce", "--quick", "--out", out), timeout=60, cwd=tmp_path)
    assert expected in one_line(p) and not p.stdout


def test_compare_refuses_local_sgd_of_period_zero(tmp_path):
    p = run(harness("compare", "--compression", "local:0", "--dry-run", "--out-dir",
                    tmp_path / "cmp"), timeout=60)
    assert "--compression 'local:0': local SGD takes its period" in one_line(p)


def test_resume_of_a_word_or_a_file_that_is_not_a_checkpoint_says_what_resume_takes(tmp_path):
    import logging

    from harness.checkpoint import load
    from harness.driver import find_resume_checkpoint

    with pytest.raises(CheckpointError, match="resume = 'AUTO' is not 'auto', 'never' or an "
                                              "existing checkpoint file"):
        find_resume_checkpoint(RunConfig(resume="AUTO"), tmp_path / "checkpoints",
                               logging.getLogger("test"))
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(CheckpointError, match="is not a checkpoint: give a checkpoint file"):
        load(config)
    truncated = tmp_path / "ckpt-000000003.npz"
    truncated.write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        load(truncated)


# --- found by the second hunt, fixed later ----------------------------------------------------

def test_a_built_in_models_keys_given_with_a_task_object_are_refused(task_file, tmp_path):
    """Before: --model and --dataset with a task were silently unused (the run trained the task)."""
    out = tmp_path / "out"
    p = run(harness("train", "--task", f"{task_file}:task", "--model", "cnn", "--dataset",
                    "synthetic", "--out-dir", out), timeout=60)
    assert one_line(p) == (
        "harness: error (rank 0): model = 'cnn', dataset = 'synthetic' would be unused: task "
        "'mine' brings its own model and data; drop them (--model, --dataset, or their config "
        "keys), or define the task as a function f(cfg) that reads it")
    assert not out.exists()


def test_a_task_function_may_read_a_built_in_key():
    import numpy as np

    from harness import Data, Task
    from harness.task import configure

    x = np.zeros((4, 2), np.float32)
    data = Data(train=(x, x[:, 0]), test=(x, x[:, 0]))

    def mine(cfg):
        return Task(framework="torch", name=f"mine-{cfg.model}", model=lambda: None,
                    loss=lambda o, y: o, data=data)

    cfg, task = configure(mine, {"model": "cnn", "seq_len": 8}, "harness.run(task)")
    assert task.name == "mine-cnn" and cfg.seq_len == 8
    with pytest.raises(ConfigError, match=r"seq_len = 8 would be unused: task 'mine-mlp'"):
        configure(mine(RunConfig()), {"seq_len": 8}, "harness.run(task)")


@pytest.mark.parametrize("argv, expected", [
    (["report", "/no/such/run"], "harness: error: result folder /no/such/run does not exist"),
    (["compare", "--config", "/no/such.toml"],
     "harness: error: config file '/no/such.toml' does not exist"),
    (["launch", "-np", "2", "--hosts", "a", "--", "--epochs", "1"], "harness: error: hosts = 'a'"),
])
def test_commands_that_are_not_a_rank_do_not_name_one(argv, expected):
    """Before: 'harness: error (rank 0): ...' from report, compare and launch, which are no rank."""
    assert one_line(run(harness(*argv), timeout=60)).startswith(expected)


@pytest.mark.parametrize("np_, servers, fix", [
    ("3", "3", "launch at least 4 ranks (-np 4 or more) or lower ps_servers"),
    ("1", "1", "launch at least 2 ranks (-np 2 or more)"),
])
def test_launch_refuses_a_parameter_server_job_without_workers_before_mpirun(tmp_path, np_,
                                                                             servers, fix):
    """Found by a third new-user hunt: every rank printed it, two of them glued on one line,
    inside mpirun's abort notice; the fix it named said "lower ps_servers" at 1 and "at least
    4 ranks (e.g. mpirun -np 5)"."""
    p = run(harness("launch", "--launcher", "mpirun", "-np", np_, "--", "--mode", "async",
                    "--ps-servers", servers, "--out-dir", tmp_path / "out"), timeout=60)
    assert one_line(p) == (f"harness: error: ps_servers = {servers} leaves no worker in a job "
                           f"of {np_} rank(s): {fix}")
    assert not (tmp_path / "out").exists()
