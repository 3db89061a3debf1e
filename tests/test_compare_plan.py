"""``harness compare``'s plan (launchers/compare.py ``plan``): one launch per framework, mode and
rank count, each a `harness train` of the same config in its own folder. Pure: nothing runs."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import pytest

from harness.config import RunConfig, parse_train_args
from harness.errors import ConfigError
from launchers.compare import plan
from conftest import harness, run

PYTHON = "/opt/venv/bin/python"
TRAIN = ["--model", "mlp", "--lr", "0.07", "--epochs", "3", "--ps-servers", "2",
         "--ps-consistency", "ssp"]


def launched(argv: list[str]) -> tuple[str, int, RunConfig]:
    """(launcher program, ranks, config of every rank) of one planned command line."""
    i = argv.index(PYTHON)
    assert argv[i + 1:i + 4] == ["-m", "harness", "train"], argv
    if "-np" in argv:                                             # horovodrun, mpirun
        ranks = int(argv[argv.index("-np") + 1])
    else:                                                         # srun
        ranks = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--ntasks=")))
    return Path(argv[0]).name, ranks, parse_train_args(argv[i + 4:])


@pytest.mark.parametrize("launcher,frameworks", [("horovodrun", ["torch", "tensorflow"]),
                                                 ("mpirun", ["tensorflow"]), ("srun", ["torch"])])
def test_every_framework_mode_and_rank_count_is_planned_once(tmp_path, launcher, frameworks):
    nps, modes = [1, 3], ["sync", "async"]
    jobs = plan(TRAIN, frameworks, nps, modes, launcher, tmp_path, PYTHON)
    common = parse_train_args(TRAIN)
    seen = set()
    for job in jobs:
        program, ranks, cfg = launched(job.argv)
        n = ranks - (common.ps_servers if cfg.mode == "async" else 0)   # workers
        seen.add((cfg.framework, cfg.mode, n))
        # sync: the chosen launcher, one rank per worker; async: the servers come on top, and
        # mpirun starts them unless the job is already under SLURM
        assert program == (launcher if cfg.mode == "sync" or launcher == "srun" else "mpirun")
        assert job.name == (f"{cfg.framework}-sync-np{n}" if cfg.mode == "sync"
                            else f"{cfg.framework}-ps-{n}w")
        # its own folder, a fresh run (never a resume of an older comparison's folder) ...
        assert (cfg.out_dir, cfg.run_name, cfg.resume) == (str(tmp_path), job.name, "never")
        # ... and otherwise the config every run shares
        for key in ("model", "lr", "epochs", "ps_servers", "ps_consistency", "seed",
                    "batch_size"):
            assert getattr(cfg, key) == getattr(common, key), key
    assert seen == set(product(frameworks, modes, nps))
    assert len(jobs) == len(seen) == len({j.name for j in jobs})


@pytest.mark.parametrize("flag", ["--framework", "--mode", "--out-dir", "--run-name",
                                  "--resume"])
def test_a_flag_compare_sets_per_run_is_refused_in_the_train_args(tmp_path, flag):
    """It used to lose silently to compare's own value for each run."""
    with pytest.raises(ConfigError, match=f"{flag} after --: compare sets {flag} for each run"):
        plan([*TRAIN, flag, "x"], ["torch"], [2], ["sync"], "horovodrun", tmp_path, PYTHON)


def test_config_keys_compare_sets_per_run_are_named_as_unused(tmp_path):
    """A config shared with harness train may set them; compare says it does not use them
    (they used to lose silently to its own values)."""
    config = tmp_path / "run.toml"
    config.write_text('model = "mlp"\nframework = "tensorflow"\nout_dir = "elsewhere"\n')
    p = run(harness("compare", "--config", config, "--np", "1", "--frameworks", "torch",
                    "--out-dir", tmp_path / "cmp", "--dry-run"), timeout=60, check=True)
    assert p.stderr.splitlines() == [
        "harness compare: the config's framework = 'tensorflow' is not used: it runs each of "
        "--frameworks",
        f"harness compare: the config's out_dir = 'elsewhere' is not used: its runs go to "
        f"{tmp_path / 'cmp'} (--out-dir)"]
    assert "--config" in p.stdout and not (tmp_path / "cmp").exists()
    # after --, as --config=PATH; values compare uses anyway are not named
    config.write_text('model = "mlp"\nmode = "sync"\nrun_name = "mine"\nout_dir = "./cmp/"\n')
    p = run(harness("compare", "--np", "1", "--out-dir", tmp_path / "cmp", "--dry-run", "--",
                    f"--config={config}"), timeout=60, check=True, cwd=tmp_path)
    assert p.stderr.splitlines() == ["harness compare: the config's run_name = 'mine' is not "
                                     "used: runs are named framework-mode-npN"]


def test_a_second_config_after_the_dashes_is_refused(tmp_path):
    """harness train reads the last --config alone: compare's own would be dropped unseen."""
    config = tmp_path / "run.toml"
    config.write_text('model = "mlp"\n')
    p = run(harness("compare", "--config", config, "--np", "1", "--dry-run", "--",
                    f"--config={config}"), timeout=60)
    assert p.returncode == 2 and f"--config {config} and --config={config} after --" in p.stderr


def test_invalid_train_args_are_refused_before_any_plan(tmp_path):
    with pytest.raises(ConfigError, match="momentum = 1.5 is out of range"):
        plan(["--momentum", "1.5"], ["torch"], [1], ["sync"], "horovodrun", tmp_path, PYTHON)


def test_compression_is_an_axis_with_its_setting_per_run(tmp_path):
    jobs = plan(TRAIN, ["torch", "tensorflow"], [2], ["sync"], "horovodrun", tmp_path, PYTHON,
                compressions="none,topk:0.05,powersgd:2,int8,local:8,local:16:2")
    got = {}
    for job in jobs:
        _, _, cfg = launched(job.argv)
        assert job.name == cfg.run_name
        got[job.name] = (cfg.compression, cfg.compression_ratio, cfg.powersgd_rank,
                         cfg.local_sgd_period, cfg.local_sgd_start_epoch)
    assert got == {f"{fw}-sync-np2{suffix}": value for fw in ("torch", "tensorflow")
                   for suffix, value in [("-none", ("none", 0.01, 4, 0, 0)),
                                         ("-topk-0.05", ("topk", 0.05, 4, 0, 0)),
                                         ("-powersgd-2", ("powersgd", 0.01, 2, 0, 0)),
                                         ("-int8", ("int8", 0.01, 4, 0, 0)),
                                         ("-local-8", ("none", 0.01, 4, 8, 0)),
                                         ("-local-16-2", ("none", 0.01, 4, 16, 2))]}


@pytest.mark.parametrize("value, message", [
    ("zip", "'zip' is not one of"), ("int8:4", "only topk/randomk"),
    ("topk:2", "compression_ratio = 2.0 is out of range"),
    ("topk,topk", "lists topk twice"),
    ("topk,topk:0.01", "topk and topk:0.01 are the same setting"),
    ("local", "local SGD takes its period"),
    ("local:x", "local SGD takes its period, a whole number of steps of at least 1"),
    ("local:0", "local SGD takes its period, a whole number of steps of at least 1"),
])
def test_a_bad_compression_axis_is_one_line_before_any_run(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        plan(TRAIN, ["torch"], [2], ["sync"], "horovodrun", tmp_path, PYTHON,
             compressions=value)


def test_compression_the_parameter_server_cannot_push_is_refused_in_the_plan(tmp_path):
    jobs = plan(TRAIN, ["torch"], [2], ["sync", "async"], "horovodrun", tmp_path, PYTHON,
                compressions="none,topk")
    assert [j.name for j in jobs] == ["torch-sync-np2-none", "torch-sync-np2-topk",
                                      "torch-ps-2w-none", "torch-ps-2w-topk"]
    with pytest.raises(ConfigError, match="workers push with topk or int8"):
        plan(TRAIN, ["torch"], [2], ["sync", "async"], "horovodrun", tmp_path, PYTHON,
             compressions="none,powersgd")
    with pytest.raises(ConfigError, match="local_sgd_period = 8 cannot run.*parameter server"):
        plan(TRAIN, ["torch"], [2], ["async"], "horovodrun", tmp_path, PYTHON,
             compressions="local:8")
