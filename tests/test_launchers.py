"""Launcher builders: exact argv lists (values with spaces and quotes stay single elements)."""

import dataclasses
import json
import os
import shlex
import subprocess
import typing
from pathlib import Path

import pytest

from conftest import PY, REPO, harness, needs_horovod, run
from harness.config import RunConfig, parse_train_args
from harness.errors import ConfigError
from launchers import LaunchSpec, build_argv
from launchers.spec import LAUNCHERS

ARGS = ["--framework", "torch", "--run-name", "my run's \"best\""]
PROG = ["/opt/my env/bin/python", "-m", "harness", "train", *ARGS]


def spec(**kw):
    return LaunchSpec(python="/opt/my env/bin/python", **kw)


def test_horovodrun():
    s = spec(launcher="horovodrun", np=4, hosts="a:2,b:2", controller="gloo",
             timeline_filename="/tmp/t l.json", fusion_threshold_mb=32, cycle_time_ms=2.5,
             autotune=True, start_timeout=60)
    assert build_argv(s, ARGS) == [
        "horovodrun", "-np", "4", "-H", "a:2,b:2", "--gloo", "--timeline-filename",
        "/tmp/t l.json", "--fusion-threshold-mb", "32", "--cycle-time-ms", "2.5", "--autotune",
        "--start-timeout", "60", *PROG]


def test_mpirun_open_mpi():
    s = spec(launcher="mpirun", np=2, hostfile="/etc/my hosts", bind_to="core", map_by="socket",
             export=["PATH", "LD_LIBRARY_PATH"], allow_run_as_root=True, oversubscribe=True)
    assert build_argv(s, ARGS) == [
        "mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--hostfile",
        "/etc/my hosts", "--bind-to", "core", "--map-by", "socket", "-x", "PATH", "-x",
        "LD_LIBRARY_PATH", *PROG]


def test_mpirun_forwards_the_horovod_settings_that_auto_reads(monkeypatch):
    """allreduce = 'auto' takes Horovod when HOROVOD_CYCLE_TIME and the like are set; a
    multi-host mpirun passes a variable only with -x (harness.backends.base.agree_on_path
    catches a line written by hand)."""
    for name in [n for n in os.environ if n.startswith("HOROVOD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "2")
    monkeypatch.setenv("HOROVOD_TIMELINE", "/tmp/t.json")
    s = LaunchSpec.with_defaults(launcher="mpirun", np=2, hosts="a,b")
    argv = build_argv(s, ARGS)
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert exported[-2:] == ["HOROVOD_TIMELINE", "HOROVOD_CYCLE_TIME"], argv


def test_mpirun_mpich():
    s = spec(launcher="mpirun", mpi_flavour="mpich", np=8, hosts="n1:4,n2:4", bind_to="core",
             export=["PATH"])
    assert build_argv(s, ARGS) == ["mpirun", "-n", "8", "-hosts", "n1:4,n2:4", "-bind-to",
                                   "core", "-genvlist", "PATH", *PROG]


def test_srun():
    s = spec(launcher="srun", np=8, nodes=2, ntasks_per_node=4, gpus_per_task=1,
             cpus_per_task=6, export=["NCCL_DEBUG"])
    assert build_argv(s, ARGS) == [
        "srun", "--mpi=pmix", "--ntasks=8", "--nodes=2", "--ntasks-per-node=4",
        "--gpus-per-task=1", "--cpus-per-task=6", "--kill-on-bad-exit=1",
        "--export=ALL,NCCL_DEBUG", *PROG]


@pytest.mark.parametrize("launcher", ["sbatch", "srun"])
def test_nodes_times_tasks_per_node_is_the_rank_count_when_np_is_not_given(launcher):
    """Found by a new-user hunt: the launch help's own example (--nodes 2 --ntasks-per-node 4,
    no -np) was refused for disagreeing with -np's default of 2, which the user never gave."""
    p = run(harness("launch", "--launcher", launcher, "--nodes", "2", "--ntasks-per-node", "4",
                    "--dry-run", "--", "--model", "cnn"), timeout=60, check=True)
    assert "--ntasks=8 --nodes=2 --ntasks-per-node=4" in p.stdout
    p = run(harness("launch", "--launcher", launcher, "-np", "4", "--nodes", "2",
                    "--ntasks-per-node", "4", "--dry-run"), timeout=60)
    assert p.returncode == 2 and "np = 4 but nodes x ntasks_per_node = 2 x 4 = 8" in p.stderr


SBATCH_EXPORT = f"--export=ALL,HARNESS_ROOT={REPO},HARNESS_PYTHON=/opt/my env/bin/python"
TRAIN_SBATCH = str(REPO / "slurm" / "train.sbatch")


def test_sbatch_passes_train_args_to_the_script():
    s = spec(launcher="sbatch", np=8, nodes=2, ntasks_per_node=4, gpus_per_task=1, time="1:00:00",
             partition="gpu", job_name="exp 1", export=["NCCL_DEBUG"])
    assert build_argv(s, ARGS) == [
        "sbatch", "--ntasks=8", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1",
        "--time=1:00:00", "--partition=gpu", "--job-name=exp 1", SBATCH_EXPORT + ",NCCL_DEBUG",
        TRAIN_SBATCH, *ARGS]


def test_sbatch_refuses_a_path_that_export_would_split():
    with pytest.raises(ConfigError, match="HARNESS_PYTHON '/a,b/python' contains a comma"):
        build_argv(LaunchSpec(launcher="sbatch", python="/a,b/python"), ARGS)


def script_directives(path: str) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("#SBATCH --") and "=" in line:
            key, value = line.removeprefix("#SBATCH --").split("=", 1)
            out[key] = value.strip()
    return out


@pytest.mark.parametrize("kw, nodes, per_node", [
    ({"np": 2}, 1, 2),                             # train.sbatch asks for 2 nodes x 4
    ({"np": 8, "nodes": 2}, 2, 4),
    ({"np": 7, "nodes": 2}, 2, 4),                 # --ntasks=7: at most 4 on a node
    ({"np": 8, "ntasks_per_node": 4}, 2, 4),
    ({"np": 6, "ntasks_per_node": 4}, 2, 4),
    ({"np": 4, "nodes": 4, "ntasks_per_node": 1}, 4, 1),
])
def test_sbatch_layout_replaces_the_scripts(kw, nodes, per_node):
    """-np N alone must not inherit train.sbatch's --nodes=2 --ntasks-per-node=4: every layout
    directive of the script is given on the command line, which wins over #SBATCH lines."""
    argv = build_argv(spec(launcher="sbatch", **kw), ARGS)
    assert argv[:4] == ["sbatch", f"--ntasks={kw['np']}", f"--nodes={nodes}",
                        f"--ntasks-per-node={per_node}"]
    script = argv[argv.index(ARGS[0]) - 1]
    assert script == TRAIN_SBATCH
    given = {a.removeprefix("--").split("=")[0] for a in argv if a.startswith("--")}
    layout = {"nodes", "ntasks", "ntasks-per-node"}
    assert layout & set(script_directives(script)) <= given


def test_sbatch_from_another_folder_submits_this_harness(tmp_path):
    """The dry run names the script by absolute path and tells it where the harness and its
    Python are, whatever the current folder."""
    p = run(harness("launch", "--launcher", "sbatch", "-np", "2", "--dry-run", "--", *ARGS),
            cwd=tmp_path, check=True)
    argv = shlex.split(p.stdout.strip())
    assert argv == ["sbatch", "--ntasks=2", "--nodes=1", "--ntasks-per-node=2",
                    f"--export=ALL,HARNESS_ROOT={REPO},HARNESS_PYTHON={PY}", TRAIN_SBATCH, *ARGS]


def test_local_is_the_program():
    assert build_argv(spec(launcher="local", np=1), ARGS) == PROG


@pytest.mark.parametrize("kw, message", [
    ({"launcher": "local", "np": 2}, "runs one process"),
    ({"launcher": "mpirun", "controller": "gloo"},
     r"controller \(--controller\) is a horovodrun option"),
    ({"launcher": "srun", "hosts": "a:1"}, "takes its hosts from SLURM"),
    ({"hosts": "a:1", "hostfile": "h"}, "not both"),
    ({"launcher": "srun", "np": 6, "nodes": 2, "ntasks_per_node": 4}, "make them agree"),
    ({"np": 0}, "np = 0 is out of range"),
    ({"launcher": "mpirun", "time": "1:00:00"}, r"time \(--time\) is an sbatch option"),
    ({"launcher": "sbatch", "bind_to": "core"}, r"bind_to \(--bind-to\) is an mpirun option"),
    ({"launcher": "horovodrun", "export": ["PATH"]}, "export .* is an mpirun/srun/sbatch option"),
    ({"launcher": "srun", "script": "my.sbatch"}, "script .* is an sbatch option"),
    ({"launcher": "sbatch", "np": 1, "nodes": 2}, "nodes = 2 is more than the np = 1 ranks"),
])
def test_bad_launch_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        LaunchSpec(**kw)


def _other_value(f):
    """A valid value of launcher field ``f`` that is not its default."""
    if f.metadata.get("choices"):
        default = f.default
        return next(c for c in f.metadata["choices"] if c != default)
    if f.name == "hosts":
        return "x:1"                                   # HOST:SLOTS (launchers/spec.py)
    typ = typing.get_type_hints(LaunchSpec)[f.name]
    base = [t for t in typing.get_args(typ) if t is not type(None)] or [typ]
    return {bool: True, int: 2, float: 1.5, list: ["PATH"], str: "x"}[base[0]]


ELASTIC = {"elastic", "min_np", "max_np", "host_discovery_script", "hosts_file",
           "elastic_timeout"}
LAUNCHER_FIELDS = [f for f in dataclasses.fields(LaunchSpec)
                   if f.metadata.get("launchers", LAUNCHERS) != LAUNCHERS]


def test_every_launcher_option_says_which_launchers_read_it():
    universal = {"launcher", "np", "python"}
    assert {f.name for f in LAUNCHER_FIELDS} == \
        {f.name for f in dataclasses.fields(LaunchSpec)} - universal


@pytest.mark.parametrize("f", LAUNCHER_FIELDS, ids=lambda f: f.name)
def test_an_option_is_refused_by_every_launcher_that_would_drop_it(f):
    """Each launcher-specific option: accepted by the launchers that read it (and changes their
    command line), refused with its name by the others (issue 12, item 19)."""
    value = _other_value(f)
    for launcher in LAUNCHERS:
        np_ = 1 if launcher == "local" else 4
        if launcher in f.metadata["launchers"] and f.name in ELASTIC:
            # launchers/elastic.py fills these in first: tests/test_elastic.py builds them
            spec(launcher=launcher, np=np_, **{"elastic": True, f.name: value,
                                                "max_np": 4 if f.name == "max_np" else None})
        elif launcher in f.metadata["launchers"]:
            plain = build_argv(spec(launcher=launcher, np=np_), ARGS)
            assert build_argv(spec(launcher=launcher, np=np_, **{f.name: value}), ARGS) != plain
        else:
            with pytest.raises(ConfigError, match=f.name):
                spec(launcher=launcher, np=np_, **{f.name: value})


@pytest.mark.parametrize("launcher, flag", [("mpirun", ["--time", "1:00:00"]),
                                            ("sbatch", ["--bind-to", "core"]),
                                            ("horovodrun", ["--nodes", "2"])])
def test_launch_refuses_another_launchers_option(launcher, flag):
    p = run(harness("launch", "--launcher", launcher, *flag, "--dry-run", "--", *ARGS))
    assert p.returncode == 2 and not p.stdout
    assert len(p.stderr.strip().splitlines()) == 1
    assert f"({flag[0]})" in p.stderr and launcher in p.stderr


def test_abbreviated_flags_are_refused():
    """horovodrun parses the program's flags with its own argparse, where `--stall` is
    ambiguous: the check before launching must not accept an abbreviation either."""
    names = ["--config"] + ["--" + f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)]
    for name in names:
        for cut in range(3, len(name)):
            short = name[:cut]
            if short not in names and sum(n.startswith(short) for n in names) == 1:
                with pytest.raises(ConfigError, match=f"unrecognized arguments: {short}"):
                    parse_train_args([short, "1"])
                break
    p = run(harness("launch", "-np", "2", "--dry-run", "--", "--stall", "60"))
    assert p.returncode == 2 and "unrecognized arguments: --stall 60" in p.stderr
    p = run(harness("train", "--stall", "60"))
    assert p.returncode == 2 and "unrecognized arguments: --stall 60" in p.stderr
    p = run(harness("launch", "--launch", "mpirun", "--dry-run", "--", *ARGS))
    assert p.returncode == 2 and "--launch" in p.stderr


def test_dry_run_prints_the_exact_command():
    """--export adds to the variables mpirun passes by default (a multi-host job's ranks need
    them: this Python's PATH and the Horovod settings that allreduce = 'auto' reads); a
    variable it gives a value (PATH=...) is not passed again with the local one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("HOROVOD_")}
    env.update(HOROVOD_CYCLE_TIME="2", MY_VAR="1")
    p = subprocess.run([str(a) for a in harness(
        "launch", "--launcher", "mpirun", "-np", "2", "--bind-to", "core", "--export",
        "MY_VAR,PATH=/opt/x/bin", "--dry-run", "--", *ARGS)], capture_output=True, text=True,
        env=env, cwd=REPO, check=True)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    ld = ["-x", "LD_LIBRARY_PATH"] if "LD_LIBRARY_PATH" in env else []
    assert shlex.split(p.stdout.strip()) == [
        "mpirun", "-np", "2", *root, "--bind-to", "core", "-x", "MY_VAR", "-x",
        "PATH=/opt/x/bin", *ld, "-x", "HOROVOD_CYCLE_TIME", PY, "-m", "harness", "train", *ARGS]


def test_launch_validates_train_args_first():
    p = run(harness("launch", "-np", "2", "--dry-run", "--", "--lr", "-1"))
    assert p.returncode == 2
    assert "lr = -1.0 is out of range" in p.stderr


def test_train_flags_survive_horovodrun_argument_parsing(monkeypatch):
    """horovodrun's argparse rejects a later flag that abbreviates two of its own options; every
    `harness train` flag must reach the program unchanged."""
    pytest.importorskip("horovod")
    import dataclasses
    import sys

    import horovod.runner.launch as hl

    from harness.config import RunConfig

    flags = ["--config"] + ["--" + f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)]
    program = ["python", "-m", "harness", "train"]
    for flag in flags:
        program += [flag, "1"]
    monkeypatch.setattr(sys, "argv", ["horovodrun", "-np", "2", *program])
    args = hl.parse_args()
    assert args.command == program


def test_launcher_runs_from_the_virtualenv_without_activation(tmp_path):
    """`make compare` runs .venv/bin/python without activating the venv: the launcher must
    still find the venv's horovodrun, and a missing launcher is a clear error."""
    import sys
    from launchers.runner import launch_environment, run as run_launcher
    from harness.errors import LaunchError

    env = launch_environment({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    with pytest.raises(LaunchError, match="'no-such-launcher' is not on PATH"):
        run_launcher(["no-such-launcher"])


def test_runner_forwards_a_stop_signal_and_keeps_the_callers_handler(tmp_path):
    """The launcher gets the signal (its ranks checkpoint and exit 75), and a handler installed
    before the run still hears of it: `harness compare` must not start its next run."""
    import signal
    import sys
    import threading
    import time

    from launchers.runner import run as run_launcher

    ready = tmp_path / "ready"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
             f"open({str(ready)!r}, 'w').close()\n"
             "time.sleep(30)\n")

    def warn():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR1)

    heard = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: heard.append(signum))
    try:
        threading.Thread(target=warn, daemon=True).start()
        assert run_launcher([sys.executable, "-c", child]) == 75
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert heard == [signal.SIGUSR1]


def sigterms_to_a_runner(tmp_path, binary: str, command: str, times: int) -> tuple[int, str]:
    """The exit code and stderr of launchers.runner.run(['sh', '-c', COMMAND]) in a process of
    its own that gets ``times`` SIGTERMs, 1.5 s apart; ORTERUN in COMMAND is a copy of
    ``binary`` named like Open MPI's launcher. What it started is ended, whatever happens."""
    import shutil
    import signal
    import subprocess
    import sys

    fake = tmp_path / "orterun"
    shutil.copy(shutil.which(binary), fake)
    script = tmp_path / "go.py"
    script.write_text(
        "import os, signal, sys, threading, time\n"
        "from launchers.runner import run\n"
        "def later():\n"
        f"    for _ in range({times}):\n"
        "        time.sleep(1.5)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=later, daemon=True).start()\n"
        f"sys.exit(run(['sh', '-c', {command.replace('ORTERUN', str(fake))!r}]))\n")
    p = subprocess.Popen([sys.executable, script], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)       # the stand-in and what it started
        except ProcessLookupError:
            pass
    return p.returncode, err[-2000:]


def test_a_stop_signal_reaches_the_launcher_a_shell_runs_and_open_mpi_hears_sigusr1(tmp_path):
    """horovodrun execs ``/bin/sh -c "mpirun ..."``: a SIGTERM must reach mpirun, not the shell
    (which would die and leave the job running), and Open MPI's mpirun gets SIGUSR1, which it
    relays to the ranks without killing them. Here a copy of ``sleep`` named like Open MPI's
    launcher stands in for mpirun: it dies of SIGUSR1, and the shell, still alive, reports
    that (128 + 10), so the code of the launcher under the shell comes back."""
    import signal

    code, err = sigterms_to_a_runner(tmp_path, "sleep", "ORTERUN 30; exit $?", 1)
    assert code == 128 + signal.SIGUSR1, (code, err)


def test_a_second_sigterm_is_passed_on_as_sigterm(tmp_path):
    """Ranks that did not stop on the first SIGTERM (sent on as SIGUSR1) are ended by the next:
    a stand-in for Open MPI's mpirun that ignores SIGUSR1 dies of the second SIGTERM, and the
    shell reports that (128 + 15)."""
    import signal

    code, err = sigterms_to_a_runner(tmp_path, "bash", "ORTERUN -c 'trap \"\" USR1; sleep 29.5 "
                                     ">/dev/null 2>&1 & wait'; exit $?", 2)
    assert code == 128 + signal.SIGTERM, (code, err)


def test_horovodrun_asks_how_horovod_was_built_once_and_of_the_torch_extension_first(
        monkeypatch, tmp_path):
    """Our patch 0010: one forked process answers every build flag horovodrun asks about (it
    used to fork one per flag, each importing TensorFlow first)."""
    util = pytest.importorskip("horovod.common.util")
    monkeypatch.setenv("HOROVOD_CACHE_DIR", str(tmp_path))     # no answer kept from a run before
    asked = []

    def check(ext, fn, desc, verbose):
        asked.append(ext)
        return None if ext == "torch" else {"mpi_built": True, "gloo_built": False,
                                            "nccl_built": 0, "ddl_built": 0, "ccl_built": 0}

    monkeypatch.setattr(util, "_check_extension_lambda", check)
    cache = next(c.cell_contents for c in util._built_flags.__closure__
                 if isinstance(c.cell_contents, dict))          # Horovod's _cache of answers
    cache.clear()
    try:
        assert (util.mpi_built(), util.gloo_built(), util.nccl_built()) == (True, False, 0)
    finally:
        cache.clear()                                # no made-up answer outlives the test
    assert asked == ["torch", "tensorflow"]        # torch first; a failed import tries the next


def _forget_built_flags(util) -> None:
    """Empty Horovod's in-memory ``_cache`` of the build flags (the disk is what is tested)."""
    next(c.cell_contents for c in util._built_flags.__closure__
         if isinstance(c.cell_contents, dict)).clear()


def test_horovodrun_keeps_the_build_flags_per_build_and_asks_again_when_it_must(
        monkeypatch, tmp_path):
    """Our patch 0011: the flags are compiled into the extensions, so the answer is kept on disk
    per build and the next horovodrun does not import a framework to ask again; a verbose check,
    a changed build or an unreadable file asks again."""
    util = pytest.importorskip("horovod.common.util")
    monkeypatch.setenv("HOROVOD_CACHE_DIR", str(tmp_path))
    flags = {"mpi_built": True, "gloo_built": True, "nccl_built": 0, "ddl_built": False,
             "ccl_built": False}
    asked = []

    def check(ext, fn, desc, verbose):
        asked.append(ext)
        return dict(flags)

    monkeypatch.setattr(util, "_check_extension_lambda", check)
    monkeypatch.setattr(util, "_built_flags_key", lambda: "build-a")
    kept = tmp_path / "built-flags-build-a.json"
    try:
        _forget_built_flags(util)
        assert util.mpi_built() is True and asked == ["torch"]
        assert json.loads(kept.read_text()) == flags
        assert [p.name for p in tmp_path.iterdir()] == [kept.name]     # no temporary file left

        _forget_built_flags(util)                   # a new horovodrun process, the same build
        assert (util.mpi_built(), util.gloo_built()) == (True, True) and asked == ["torch"]

        _forget_built_flags(util)
        assert util.mpi_built(verbose=True) and asked == ["torch"] * 2   # --verbose asks

        monkeypatch.setattr(util, "_built_flags_key", lambda: "build-b")  # rebuilt
        _forget_built_flags(util)
        assert util.gloo_built() and asked == ["torch"] * 3
        assert (tmp_path / "built-flags-build-b.json").exists()

        for bad in ("{not json", '{"mpi_built": true}', "[]"):
            kept.write_text(bad)
            monkeypatch.setattr(util, "_built_flags_key", lambda: "build-a")
            _forget_built_flags(util)
            n = len(asked)
            assert util.mpi_built() is True and len(asked) == n + 1, bad
            assert json.loads(kept.read_text()) == flags               # and it is written again

        monkeypatch.setenv("HOROVOD_CACHE_DIR", str(tmp_path / "file" / "below"))
        (tmp_path / "file").write_text("")          # a folder that cannot be made: asks, no error
        _forget_built_flags(util)
        assert util.mpi_built() is True
    finally:
        _forget_built_flags(util)


def test_the_build_key_changes_with_the_extension_libraries(tmp_path):
    util = pytest.importorskip("horovod.common.util")
    assert util._built_flags_key(str(tmp_path)) is None           # no extension library
    (tmp_path / "torch").mkdir()
    lib = tmp_path / "torch" / "mpi_lib_v2.so"
    lib.write_bytes(b"x" * 10)
    os.utime(lib, ns=(1_000_000_000, 1_000_000_000))
    first = util._built_flags_key(str(tmp_path))
    assert first and util._built_flags_key(str(tmp_path)) == first
    os.utime(lib, ns=(2_000_000_000, 2_000_000_000))               # reinstalled
    assert util._built_flags_key(str(tmp_path)) != first
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "mpi_lib.so").write_bytes(b"y")
    assert util._built_flags_key(str(tmp_path)) not in (first, None)


def test_the_build_key_is_the_same_through_a_symlinked_package(tmp_path):
    """A virtualenv reached through a symlink (the repo's .venv) is the same build: before,
    the key used the path Python found the package under, and each path kept a file."""
    util = pytest.importorskip("horovod.common.util")
    real = tmp_path / "real"
    (real / "torch").mkdir(parents=True)
    (real / "torch" / "mpi_lib_v2.so").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    assert util._built_flags_key(str(tmp_path / "link")) == util._built_flags_key(str(real))


@pytest.mark.parametrize("env, kept", [
    ({"HOROVOD_CACHE_DIR": "relative/cache"}, False),      # under the working directory: no
    ({"HOME": "~nobody-here", "XDG_CACHE_HOME": ""}, False),   # a ~ that does not expand
    ({"HOROVOD_BUILT_FLAGS_CACHE": "0"}, False),           # the off switch
    ({"HOROVOD_BUILT_FLAGS_CACHE": "off"}, False),
    ({"HOROVOD_BUILT_FLAGS_CACHE": "1"}, True),
])
def test_the_build_flags_are_kept_only_where_they_should_be(monkeypatch, tmp_path, env, kept):
    util = pytest.importorskip("horovod.common.util")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOROVOD_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in env.items():
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    if "HOME" in env:
        monkeypatch.delenv("HOROVOD_CACHE_DIR")
    path = util._built_flags_cache_path("k")
    assert (path is not None) == kept, path
    assert path is None or os.path.isabs(path)


def test_kept_build_flags_are_readable_by_all_and_old_builds_are_pruned(monkeypatch, tmp_path):
    """A cache folder shared by several users serves them all (it was private to its writer);
    files of builds no launch read for BUILT_FLAGS_KEEP_DAYS go (they piled up)."""
    import stat
    import time
    util = pytest.importorskip("horovod.common.util")
    flags = {name: False for name in util.BUILT_FLAGS}
    old, recent = tmp_path / "built-flags-old.json", tmp_path / "built-flags-recent.json"
    for path, days in ((old, util.BUILT_FLAGS_KEEP_DAYS + 1), (recent, 1)):
        path.write_text(json.dumps(flags))
        past = time.time() - days * 86400
        os.utime(path, (past, past))
    other = tmp_path / "notes.json"          # not a file of ours
    other.write_text("{}")
    os.utime(other, (0, 0))
    assert util._read_built_flags(str(recent)) == flags          # a read keeps it fresh
    assert time.time() - recent.stat().st_mtime < 60
    new = tmp_path / "built-flags-new.json"
    util._write_built_flags(str(new), flags)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "built-flags-new.json", "built-flags-recent.json", "notes.json"]


@pytest.mark.mpi
@needs_horovod
def test_a_real_horovodrun_reads_the_kept_build_flags(tmp_path):
    """End to end: horovodrun writes the build's flags on its first launch, and the next launch
    goes by them (a file saying Horovod has neither MPI nor Gloo stops it), so it did not
    import a framework to ask."""
    env = {"HOROVOD_CACHE_DIR": str(tmp_path)}
    hvdrun = str(Path(PY).parent / "horovodrun")
    first = run([hvdrun, "-np", "1", "true"], env=env, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    [kept] = tmp_path.glob("built-flags-*.json")
    flags = json.loads(kept.read_text())
    assert flags["mpi_built"] and flags["gloo_built"]
    kept.write_text(json.dumps({**flags, "mpi_built": False, "gloo_built": False}))
    second = run([hvdrun, "-np", "1", "true"], env=env, timeout=120)
    assert second.returncode != 0
    assert "Neither MPI nor Gloo" in second.stdout + second.stderr, second.stderr[-2000:]


def test_json_line_finds_the_object_with_its_key_where_mpirun_joined_two_ranks_lines():
    """ci53 failed on this: rank 1's line and rank 0's arrived as one, and the helper that the
    multi-rank tests read their results with decoded rank 1's object."""
    from conftest import json_line
    joined = '[1,1]<stdout>:{"rank": 1}[1,0]<stdout>:{"compressed_training": {"acc": 0.97}}'
    assert json_line("start\n" + joined + "\n", "compressed_training") == \
        {"compressed_training": {"acc": 0.97}}
    with pytest.raises(AssertionError, match="no JSON line"):
        json_line('{"rank": 1} mentions "compressed_training" only as text', "compressed_training")
