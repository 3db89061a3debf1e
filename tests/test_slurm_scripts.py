"""The slurm/ scripts' own logic, run by bash with fake SLURM and MPI commands on PATH.

No cluster: each fake (srun, mpirun, sbatch, scancel, scontrol, and the job's Python) records
its argv, folder and a few variables as one JSON line, so a test reads exactly what a script
would have started. The job's Python runs `harness launch --print-argv` for real: that is how
the scripts get their srun/mpirun lines. tests/test_slurm.py runs the scripts on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PY, REPO, harness, run
from harness.backends.common import HOROVOD_TUNING
from harness.config import parse_train_args
from launchers.spec import DEFAULT_EXPORTS

SLURM_DIR = REPO / "slurm"
TOOLS = ("srun", "mpirun", "sbatch", "scancel", "scontrol")
JOB = "7"

FAKE = f"""#!{sys.executable}
import json, os, signal, sys, time
name = os.path.basename(sys.argv[0])
if name == "python" and sys.argv[1:4] == ["-m", "harness", "launch"]:
    # the scripts build their launch line with the harness itself: run the real one
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
log = os.environ["FAKE_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"tool": name, "argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
                         "env": {{k: os.environ.get(k) for k in
                                 ("PYTHONPATH", "HARNESS_ROOT", "HARNESS_PYTHON", "RUN_NAME")}}}})
            + "\\n")
if name == "sbatch":                     # a job id per submission, as --parsable prints it
    with open(log) as f:
        print(100 + sum(json.loads(line)["tool"] == "sbatch" for line in f))
if name == "scancel" and os.environ.get("FAKE_WAIT") in ("srun", "mpirun"):   # job steps
    with open(log) as f:
        for call in map(json.loads, f):
            if call["tool"] == os.environ["FAKE_WAIT"]:
                os.kill(call["pid"], signal.SIGUSR1)
if os.environ.get("FAKE_WAIT") == name:  # a long step: stops like the ranks do on USR1
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
    open(log + ".ready", "w").close()
    time.sleep(30)
    sys.exit(1)
if name == "python" and sys.argv[1:3] == ["-m", "harness"] and "report" in sys.argv:
    print("report argv: " + json.dumps(sys.argv[1:]))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


class FakeCluster:
    """Fake commands in ``bin``; ``python`` lives in a folder with a space and a quote."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.pybin = root / "my env's bin"
        for d in (self.bin, self.pybin):
            d.mkdir(parents=True)
        for name in TOOLS:
            (self.bin / name).write_text(FAKE)
            (self.bin / name).chmod(0o755)
        self.python = self.pybin / "python"
        self.python.write_text(FAKE)
        self.python.chmod(0o755)
        self.log = root / "calls.jsonl"
        self.submit_dir = root / "submit dir"
        self.submit_dir.mkdir()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HARNESS_"))}
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", FAKE_LOG=str(self.log),
                   SLURM_JOB_ID=JOB, SLURM_JOB_NAME="harness-train", SLURM_NTASKS="4",
                   SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[1-2]",
                   SLURM_SUBMIT_DIR=str(self.submit_dir), HARNESS_ROOT=str(REPO),
                   HARNESS_PYTHON=str(self.python))
        env.update(extra)
        return env

    def calls(self, tool: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in calls if tool is None or c["tool"] == tool]

    def batch(self, script: str, *args: str, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run a batch script as slurmd would: bash, in the submit folder."""
        return subprocess.run(["bash", str(SLURM_DIR / script), *args], env=env or self.env(),
                              cwd=cwd or self.submit_dir, capture_output=True, text=True,
                              timeout=60)


@pytest.fixture
def fake(tmp_path) -> FakeCluster:
    return FakeCluster(tmp_path)


def sbatch_directives(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


# --- preemption: every batch script (issue 12, item 16) ---------------------------------------

@pytest.mark.parametrize("script", sorted(p.name for p in SLURM_DIR.glob("*.sbatch")))
def test_every_batch_script_asks_for_the_warning_and_requeues(script):
    """Both READMEs promise it for every script."""
    d = sbatch_directives(SLURM_DIR / script)
    assert "requeue" in d and d.get("open-mode") == "append", d
    if script == "elastic.sbatch":
        # its ranks run under horovodrun, which passes no signal on: a preempted elastic job
        # is requeued and resumes from its last checkpoint, without the warning's checkpoint
        # (slurm/README.md says so)
        assert "signal" not in d
        return
    assert re.fullmatch(r"B:USR1@\d+", d.get("signal", "")), d
    text = (SLURM_DIR / script).read_text()
    assert "run_preemptible" in text


def warn_and_wait(fake: FakeCluster, script: str, waiting: str, **env: str) -> tuple[int, str]:
    """Start ``script``; once the fake ``waiting`` command runs, send the batch shell the
    scheduler's warning (what --signal=B:USR1@120 delivers) and wait for the script's end."""
    proc = subprocess.Popen(["bash", str(SLURM_DIR / script), "--model", "mlp"],
                            env=fake.env(FAKE_WAIT=waiting, **env), cwd=fake.submit_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = Path(str(fake.log) + ".ready")
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"{waiting} never started"
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in fake.calls(waiting):
            try:
                os.kill(c["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.returncode, out


def test_compare_sbatch_stops_at_the_warning_and_requeues(fake):
    """The warning reaches `harness compare` itself (it must not start the next run), its run
    stops at a checkpoint (exit 75), and the job requeues itself."""
    rc, out = warn_and_wait(fake, "compare.sbatch", "python", SLURM_NTASKS="2")
    assert rc == 0, out
    assert [c["argv"] for c in fake.calls("scontrol")] == [["requeue", JOB]], out
    assert "requeueing job 7" in out


def test_train_sbatch_requeues_even_when_the_step_ends_at_once(fake):
    """The step may end (exit 75) while the batch shell is still in its trap; the script must
    still see 75 and requeue, not the signal's own status."""
    rc, out = warn_and_wait(fake, "train.sbatch", "srun")
    assert rc == 0, out
    assert ["--signal=USR1", JOB] in [c["argv"] for c in fake.calls("scancel")]
    assert [c["argv"] for c in fake.calls("scontrol")] == [["requeue", JOB]], out


def test_requeued_compare_continues_in_its_own_out_dir(fake):
    """The first start plans a fresh comparison; the requeued job (same job id, same out-dir)
    asks compare to continue it instead of refusing the folder it wrote itself."""
    fake.batch("compare.sbatch", "--model", "mlp", env=fake.env(SLURM_NTASKS="2"))
    fake.batch("compare.sbatch", "--model", "mlp",
               env=fake.env(SLURM_NTASKS="2", SLURM_RESTART_COUNT="1"))
    first, again = [c["argv"] for c in fake.calls("python")]
    assert first[:3] == ["-m", "harness", "compare"] and "--resume" not in first
    out = first[first.index("--out-dir") + 1]
    assert out == f"results/compare-{JOB}"
    assert again[again.index("--out-dir") + 1] == out
    assert "--resume" in again[:again.index("--")]
    assert first[first.index("--"):] == again[again.index("--"):] == ["--", "--model", "mlp"]


# --- HARNESS_LAUNCH (item 18) -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["junk", "mpi", "SRUN"])
def test_unknown_harness_launch_is_refused(fake, value):
    p = fake.batch("train.sbatch", "--model", "mlp", env=fake.env(HARNESS_LAUNCH=value))
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"HARNESS_LAUNCH={value} is not a launcher" in p.stderr
    assert "srun" in p.stderr and "mpirun" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not fake.calls("srun") and not fake.calls("mpirun")


@pytest.mark.parametrize("value", ["", "srun", "mpirun"])
def test_known_harness_launch_values_start_the_ranks(fake, value):
    p = fake.batch("train.sbatch", "--model", "mlp", env=fake.env(HARNESS_LAUNCH=value))
    assert p.returncode == 0, p.stdout + p.stderr
    (call,) = fake.calls(value or "srun")
    program = [str(fake.python), "-m", "harness", "train", "--run-name", f"harness-train-{JOB}",
               "--model", "mlp"]
    assert call["argv"][-len(program):] == program
    if value == "mpirun":      # remote ranks get the harness's PYTHONPATH too
        argv = call["argv"]
        assert "PYTHONPATH" in [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]


# --- launch lines come from the builders (issue 13, section 4) ---------------------------------

def _exports(*names: str) -> list[str]:
    return [v for v in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV")
            if v in names or v in os.environ]


def test_srun_line_of_the_batch_scripts_is_the_builders(fake):
    """Golden: the whole srun line of train.sbatch on a GPU allocation, as the builders make it
    (`harness launch --launcher srun`), block distribution included."""
    env = fake.env(SLURM_CPUS_PER_TASK="8", SLURM_GPUS_PER_TASK="1")
    p = fake.batch("train.sbatch", "--model", "mlp", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    (call,) = fake.calls("srun")
    assert call["argv"] == [
        "--mpi=pmix", "--ntasks=4", "--gpus-per-task=1", "--cpus-per-task=8",
        "--kill-on-bad-exit=1", "--distribution=block",
        "--export=" + ",".join(["ALL", *_exports("PYTHONPATH")]),
        str(fake.python), "-m", "harness", "train", "--run-name", f"harness-train-{JOB}",
        "--model", "mlp"]


def test_a_users_task_goes_through_the_batch_scripts(fake):
    """`sbatch slurm/train.sbatch --task FILE:NAME` (README): the task reaches every rank."""
    p = fake.batch("train.sbatch", "--task", "examples/torch_own_model.py:task", "--epochs", "3",
                   env=fake.env())
    assert p.returncode == 0, p.stdout + p.stderr
    (call,) = fake.calls("srun")
    assert call["argv"][-4:] == ["--task", "examples/torch_own_model.py:task", "--epochs", "3"]
    p = fake.batch("train.sbatch", "--task", "no_colon", env=fake.env())
    assert p.returncode == 2 and "must be PATH.py:NAME" in p.stdout + p.stderr
    assert not fake.calls("srun")[1:]                   # the bad one started no ranks


def test_mpirun_line_of_the_batch_scripts_is_the_builders(fake):
    env = fake.env(HARNESS_LAUNCH="mpirun", SLURM_NTASKS="6", SLURM_NTASKS_PER_NODE="3(x2)")
    p = fake.batch("ps.sbatch", "--model", "mlp", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    (call,) = fake.calls("mpirun")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    named = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "NCCL_DEBUG", "HARNESS_FAULT",
             "HARNESS_FAULT_RELEASE")
    defaults = [v for v in (*DEFAULT_EXPORTS, *HOROVOD_TUNING) if v in env and v not in named]
    exports = [a for v in (*named, *defaults) for a in ("-x", v)]   # the script's, then defaults
    # inside an allocation mpirun takes its slots from SLURM: never --oversubscribe
    assert call["argv"] == [
        "-np", "6", *root, "--bind-to", "none", "--map-by", "ppr:3:node", *exports,
        str(fake.python), "-m", "harness", "train", "--mode", "async", "--ps-servers", "1",
        "--run-name", f"harness-train-{JOB}", "--model", "mlp"]


@pytest.mark.parametrize("script", ["train.sbatch", "ps.sbatch"])
def test_bad_train_arguments_fail_the_job_before_any_rank_starts(fake, script):
    p = fake.batch(script, "--model", "mlp", "--lr", "nan")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "lr" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not fake.calls("srun") and not fake.calls("mpirun")


# --- harness launch --launcher sbatch, from any folder (item 17) --------------------------------

def exported(argv: list[str]) -> dict[str, str]:
    (opt,) = [a for a in argv if a.startswith("--export=")]
    pairs = opt.removeprefix("--export=").split(",")
    assert pairs[0] == "ALL"
    return dict(p.split("=", 1) for p in pairs[1:] if "=" in p)


def test_sbatch_launch_runs_from_any_folder(fake):
    """`harness launch --launcher sbatch` from a folder outside the repository: the script is
    found, finds the harness and its Python, and the ranks run in the submit folder (where
    relative paths in the arguments point)."""
    p = run(harness("launch", "--launcher", "sbatch", "-np", "2", "--dry-run", "--",
                    "--model", "mlp", "--run-name", "my run", "--out-dir", "out"),
            cwd=fake.submit_dir, check=True)
    argv = shlex.split(p.stdout.strip())
    script = Path(argv[argv.index("--model") - 1])
    assert script.is_absolute() and script.is_file(), argv
    assert exported(argv) == {"HARNESS_ROOT": str(REPO), "HARNESS_PYTHON": PY}
    # the job's environment: sbatch's (--export=ALL,...), the fake Python in place of the venv's
    env = fake.env(SLURM_NTASKS="2", HARNESS_PYTHON=str(fake.python))
    b = subprocess.run(["bash", str(script), *argv[argv.index("--model"):]], env=env,
                       cwd=fake.submit_dir, capture_output=True, text=True, timeout=60)
    assert b.returncode == 0, b.stdout + b.stderr
    (call,) = fake.calls("srun")
    assert call["cwd"] == str(fake.submit_dir)
    assert call["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    assert call["argv"][call["argv"].index(str(fake.python)):] == [
        str(fake.python), "-m", "harness", "train", "--run-name", f"harness-train-{JOB}",
        "--model", "mlp", "--run-name", "my run", "--out-dir", "out"]


def test_batch_script_without_the_harness_says_how_to_find_it(fake, tmp_path):
    env = fake.env()
    env.pop("HARNESS_ROOT")
    env["SLURM_SUBMIT_DIR"] = str(fake.submit_dir)
    p = fake.batch("train.sbatch", "--model", "mlp", env=env)
    assert p.returncode == 2
    assert "set HARNESS_ROOT" in p.stderr and not fake.calls("srun")


# --- the scaling sweep (item 15) ----------------------------------------------------------------

def sweep(fake: FakeCluster, out_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM_DIR / "scaling_sweep.sh"), "1 2", *args],
                          env=fake.env(OUT_DIR=out_dir), cwd=fake.submit_dir,
                          capture_output=True, text=True, timeout=60)


def test_scaling_sweep_jobs_survive_a_requeue_and_report_with_spaces(fake):
    out = "sweep out/it's \"here\""
    p = sweep(fake, out, "--framework", "torch", "--model", "mlp")
    assert p.returncode == 0, p.stdout + p.stderr
    train, train2, report = fake.calls("sbatch")
    for n, call in ((1, train), (2, train2)):
        argv = call["argv"]
        assert f"--nodes={n}" in argv and f"--job-name=scaling-n{n}" in argv
        script = Path(argv[argv.index("--out-dir") - 1])
        assert script == SLURM_DIR / "train.sbatch"
        train_args = argv[argv.index("--out-dir"):]
        # train.sbatch requeues itself after a preemption; the same arguments must then resume
        # the job's own checkpoint
        assert parse_train_args(train_args).resume == "auto"
        assert train_args == ["--out-dir", out, "--framework", "torch", "--model", "mlp"]
    assert "--dependency=afterany:101" in train2["argv"]
    assert "--dependency=afterany:102" in report["argv"]
    wrap = report["argv"][report["argv"].index("--wrap") + 1]
    # sbatch --wrap runs the line with /bin/sh in the submit folder
    r = subprocess.run(["sh", "-c", wrap], env=fake.env(), cwd=fake.submit_dir,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("report argv: ")][0]
    assert json.loads(line.removeprefix("report argv: ")) == [
        "-m", "harness", "report", "--out", out, f"{out}/scaling-n1", f"{out}/scaling-n2"]
    (py,) = fake.calls("python")
    assert py["argv"][0] == "-m"      # the interpreter in "my env's bin" ran, not a split path


def test_scaling_sweep_refuses_existing_runs_before_submitting(fake):
    (fake.submit_dir / "old" / "scaling-n2").mkdir(parents=True)
    p = sweep(fake, "old", "--model", "mlp")
    assert p.returncode == 2
    assert "old/scaling-n2 already exists" in p.stderr and "OUT_DIR" in p.stderr
    assert not fake.calls("sbatch")
    p = subprocess.run(["bash", str(SLURM_DIR / "scaling_sweep.sh"), "1 two"],
                       env=fake.env(), cwd=fake.submit_dir, capture_output=True, text=True)
    assert p.returncode == 2 and "'two'" in p.stderr and not fake.calls("sbatch")
