"""The gpt language model: spec, pysource data, both frameworks agreeing to the last weight,
and its records (perplexity, tokens/s) from real runs."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import (FRAMEWORKS, checkpoint_weights, fw_check, harness, latest_checkpoint,
                      launch, read_jsonl, run, summary)
from harness.config import RunConfig
from harness.data import load_npz, pysource, pysource_files
from harness.driver import eval_record, language_model_summary
from harness.errors import ConfigError, DataError
from models import get_spec
from models.tasks import builtin

SMALL = ["--model", "gpt", "--dataset", "pysource", "--gpt-layers", "2", "--gpt-dim", "32",
         "--gpt-heads", "4", "--seq-len", "16", "--text-tokens", "16384"]


# --- spec and data (unit tier) -------------------------------------------------------------

def test_spec_counts_parameters_and_flops_per_token():
    L, D, T, V = 3, 48, 20, 256
    spec = get_spec("gpt", (T,), V, layers=L, dim=D, heads=6)
    per_block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) \
        + (4 * D * D + D)
    assert spec.num_parameters == V * D + T * D + L * per_block + 2 * D + V * D
    matmul = L * (3 * D * D + D * D + 8 * D * D) + D * V        # weights a token meets
    assert spec.flops_per_sample == T * (2 * matmul + L * 4 * T * D)
    assert spec.tokens_per_sample == T
    with pytest.raises(ValueError, match="divide"):
        get_spec("gpt", (T,), V, layers=1, dim=50, heads=4)


def test_harness_models_lists_gpt_with_flops_per_token():
    out = run(harness("models"), check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("gpt"))
    spec = get_spec("gpt")
    assert f"{spec.num_parameters:,d}" in line
    assert f"{spec.flops_per_sample / spec.tokens_per_sample / 1e6:.3f} MFLOP/token" in line


def test_pysource_windows_come_from_the_sorted_stdlib_split_by_file():
    files = pysource_files()
    assert files == sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = pysource(32, 32 * 100)
    assert data.num_classes == 256
    assert (len(data.train), len(data.test)) == (100, 25)
    assert data.x_train.dtype == np.int64 and data.x_train.shape == (100, 32)
    # y is x shifted by one byte: every window is a contiguous slice of its split's text
    assert np.array_equal(data.x_train[:, 1:], data.y_train[:, :-1])
    test_text = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 == 9)
    train_text = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 != 9)
    for x, y, text in ((data.x_test, data.y_test, test_text),
                       (data.x_train, data.y_train, train_text)):
        for i in (0, len(x) // 2, len(x) - 1):
            window = bytes(x[i].astype(np.uint8)) + bytes([y[i, -1]])
            assert window in text
    assert bytes(data.x_train[0].astype(np.uint8)) == train_text[:32]   # evenly spread: from 0
    fp = data.fingerprint()
    assert fp["files"] == len(files) and len(fp["sha256"]) == 16
    # the unigram baseline: the test targets under the training bytes' add-one frequencies
    counts = np.bincount(np.frombuffer(train_text, np.uint8), minlength=256) + 1.0
    logp = np.log(counts / counts.sum())
    assert fp["unigram_test_perplexity"] == pytest.approx(
        math.exp(-logp[data.y_test.ravel()].mean()), abs=1e-4)
    again = pysource(32, 32 * 100)
    assert np.array_equal(again.x_train, data.x_train) and again.fingerprint() == fp
    assert len(pysource(32, 0).train) > 100          # 0: every window


def test_npz_token_windows_train_gpt_and_the_wrong_pairs_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (40, 13))
    path = tmp_path / "tok.npz"
    np.savez(path, x_train=tokens[:30, :-1], y_train=tokens[:30, 1:], x_test=tokens[30:, :-1],
             y_test=tokens[30:, 1:])
    data = load_npz(path)
    assert data.num_classes == int(tokens.max()) + 1 and data.x_train.dtype.kind == "i"
    task = builtin(RunConfig(model="gpt", dataset="npz", data_path=str(path), seq_len=12)).torch
    assert task.tokens_per_sample == 12
    with pytest.raises(ConfigError, match="seq_len = 12"):
        builtin(RunConfig(model="gpt", dataset="npz", data_path=str(path), seq_len=16))
    with pytest.raises(DataError, match="set model = 'gpt'"):
        builtin(RunConfig(model="mlp", dataset="npz", data_path=str(path)))
    images = tmp_path / "img.npz"
    np.savez(images, x_train=rng.random((8, 4)), y_train=np.arange(8) % 2,
             x_test=rng.random((4, 4)), y_test=np.arange(4) % 2)
    with pytest.raises(DataError, match="token windows"):
        builtin(RunConfig(model="gpt", dataset="npz", data_path=str(images)))


@pytest.mark.parametrize("values, message", [
    ({"model": "gpt"}, "dataset = 'digits' holds images"),
    ({"model": "cnn", "dataset": "pysource"}, "set model = 'gpt'"),
    ({"model": "gpt", "dataset": "pysource", "gpt_dim": 30, "gpt_heads": 4},
     "gpt_dim = 30 does not divide into gpt_heads = 4"),
])
def test_bad_gpt_configs_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**values)


def test_bad_gpt_flags_exit_2_and_write_nothing(results):
    p = run(harness("train", "--model", "gpt", "--dataset", "pysource", "--gpt-dim", "30",
                    "--out-dir", results))
    assert p.returncode == 2 and "gpt_dim = 30" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not any(results.iterdir())


def test_records_add_perplexity_and_tokens_for_language_models():
    rec = eval_record(["acc"], np.array([2.0 * 4, 0.5 * 4, 4]), tokens_per_sample=16)
    assert rec["eval_perplexity"] == pytest.approx(math.exp(2.0))
    assert "eval_perplexity" not in eval_record(["acc"], np.array([8.0, 2.0, 4]))
    s = language_model_summary({"samples_per_s_total": 10.0, "samples_per_s_per_device": 5.0,
                                "samples_per_s_wall": 8.0, "final_eval_loss": 1.0}, 64)
    assert s == {"tokens_per_sample": 64, "tokens_per_s_total": 640.0,
                 "tokens_per_s_per_device": 320.0, "tokens_per_s_wall": 512.0,
                 "final_eval_perplexity": pytest.approx(math.e)}
    assert language_model_summary({"final_eval_loss": 1.0}, 0) == {}


# --- both frameworks, one process each -----------------------------------------------------

@pytest.mark.framework
def test_same_weights_give_the_same_logits():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for fw in FRAMEWORKS:
            fw_check(fw, "forward", "gpt", Path(d) / f"{fw}.npy")
        t, f = np.load(Path(d) / "torch.npy"), np.load(Path(d) / "tensorflow.npy")
    assert t.shape == (4, 16, 256)
    assert np.abs(t - f).max() <= 1e-5


@pytest.mark.framework
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fifty_steps_agree_across_frameworks(optimizer, tmp_path):
    """Step 0's loss within 1e-5, 50 steps within 1e-4 (the issue asks 1e-3; measured: about
    1e-6 with SGD and 7e-6 with Adam, which needs the embedding's gradient summed per token,
    else 0.04, and PyTorch's epsilon, else 4e-4)."""
    runs = {fw: fw_check(fw, "gpt_fidelity", optimizer, tmp_path / f"{fw}.npz")["losses"]
            for fw in FRAMEWORKS}
    t, f = np.array(runs["torch"]), np.array(runs["tensorflow"])
    assert abs(t[0] - f[0]) <= 1e-5
    assert np.abs(t - f).max() <= 1e-4
    assert t[-1] < t[0] - 1.5                        # it learned (5.5 at the start: ln 256)


# --- real runs -----------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_two_ranks_equal_one_rank_with_double_batch_and_records_tokens(fw, results):
    """np=2 with batch B == np=1 with batch 2B within 1e-5; the records carry the test
    perplexity (exp of the test loss), tokens/s and, in TensorBoard, both."""
    common = ["--framework", fw, *SMALL, "--momentum", "0", "--lr-scaling", "none", "--lr",
              "0.3", "--epochs", "1", "--max-steps", "12", "--out-dir", results]
    run(launch("mpirun", 2, *common, "--batch-size", "8", "--run-name", "np2"), timeout=300,
        check=True)
    run(launch("local", 1, *common, "--batch-size", "16", "--run-name", "np1"), timeout=300,
        check=True)
    a = checkpoint_weights(latest_checkpoint(results / "np2"))
    b = checkpoint_weights(latest_checkpoint(results / "np1"))
    assert len(a) == len(get_spec("gpt", (16,), 256, layers=2, dim=32, heads=4).params)
    for k in b:
        assert np.abs(a[k] - b[k]).max() <= 1e-5 * max(np.abs(b[k]).max(), 1.0), k
    s = summary(results / "np2")
    assert s["tokens_per_sample"] == 16
    assert s["tokens_per_s_total"] == pytest.approx(16 * s["samples_per_s_total"])
    assert s["final_eval_perplexity"] == pytest.approx(math.exp(s["final_eval_loss"]))
    records = read_jsonl(results / "np2" / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    assert all(r["tokens_per_s_total"] == pytest.approx(16 * r["samples_per_s_total"])
               for r in steps)
    final = [r for r in records if r["kind"] in ("epoch", "eval")][-1]
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert records[0]["data"]["unigram_test_perplexity"] > 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(results / "np2" / "tb"))
    ea.Reload()
    assert {"perf/tokens_per_s", "eval/perplexity"} <= set(ea.Tags()["scalars"])


def test_a_gpt_checkpoint_names_its_size_and_bad_values_are_refused(tmp_path):
    from harness.driver import checkpoint_identity, perplexity
    from harness.task import Task, TaskError

    cfg = RunConfig(model="gpt", dataset="pysource", seq_len=16, text_tokens=1024)
    task = builtin(cfg).torch
    data = task.load_data()
    a = checkpoint_identity(cfg, task, data)
    b = checkpoint_identity(cfg.replace(gpt_heads=8), task, data)
    assert a["gpt"] == {"layers": 2, "dim": 64, "heads": 4} and a != b    # same shapes
    assert perplexity(float("nan")) is None and perplexity(1e4) is None
    empty = tmp_path / "empty.npz"
    np.savez(empty, x_train=np.zeros((0, 4), np.int64), y_train=np.zeros((0, 4), np.int64),
             x_test=np.ones((2, 4), np.int64), y_test=np.ones((2, 4), np.int64))
    with pytest.raises(DataError, match="x_train is empty"):
        load_npz(empty)

    def t(**kw):
        return Task(framework="torch", model=lambda: None, loss=lambda o, y: o, data=data,
                    metrics={"perplexity": lambda o, y: o}, **kw)

    t()                                    # a metric of that name is fine for a classifier
    with pytest.raises(TaskError, match="rename it"):
        t(tokens_per_sample=16)
    with pytest.raises(TaskError, match="tokens_per_sample = 1.5"):
        t(tokens_per_sample=1.5)
