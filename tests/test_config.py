"""Config: typed fields, validation messages, TOML, CLI flags derived from the fields."""

import argparse
import dataclasses

import pytest

from harness.config import RunConfig, add_config_arguments, overrides_from_namespace, \
    parse_train_args
from harness.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("values, message", [
    ({"lr": -0.1}, "lr = -0.1 is out of range"),
    ({"lr": "fast"}, "lr = 'fast' has the wrong type"),
    ({"model": "resnet"}, "model = 'resnet' is not one of"),
    ({"framework": "pytorch"}, "did you mean 'torch'"),
    ({"batch_size": 0}, "batch_size = 0 is out of range"),
    ({"epochs": 2.5}, "epochs = 2.5 has the wrong type"),
    ({"shuffle": "yes"}, "shuffle = 'yes' has the wrong type"),
    ({"dataset": "npz"}, "needs data_path"),
    ({"mode": "async", "optimizer": "adam"}, "not available in async mode"),
    ({"tf_loop": "fit"}, "needs framework = 'tensorflow'"),
    ({"lr": float("nan")}, "lr = nan is not a finite number"),
    ({"lr": float("inf")}, "lr = inf is not a finite number"),
    ({"momentum": float("nan")}, "momentum = nan is not a finite number"),
    ({"grad_exchange": "flat", "reduction": "adasum"}, "it needs grad_exchange = 'optimizer'"),
    # found by a new-user hunt: fit trained with the average, Adasum silently dropped
    ({"framework": "tensorflow", "tf_loop": "fit", "reduction": "adasum"},
     "reduction = 'adasum' is not available with tf_loop = 'fit'"),
    ({"framework": "tensorflow", "tf_loop": "fit", "nan_policy": "skip"},       # it did nothing
     "nan_policy = 'skip' is not possible with tf_loop = 'fit'"),
    ({"reduction": "adasum", "nan_policy": "skip"},
     "nan_policy = 'skip' with reduction = 'adasum' is not possible in PyTorch"),
    ({"grad_exchange": "flat", "framework": "tensorflow", "tf_loop": "fit"},
     "set grad_exchange = 'optimizer'"),
    ({"compression": "topk", "reduction": "adasum"},
     "compression = 'topk' cannot be combined with reduction = 'adasum'"),
    ({"compression": "topk", "compression_ratio": 0.0}, "compression_ratio = 0.0 is out of range"),
    ({"compression": "randomk", "compression_ratio": 1.5},
     "compression_ratio = 1.5 is out of range"),
    ({"compression": "sign", "mode": "async"}, "workers push with topk or int8"),
    ({"compression": "fp16", "mode": "async"}, "compression = .fp16. compresses the sync"),
    ({"compression": "sign", "framework": "tensorflow", "tf_loop": "fit"},
     "compression = 'sign' runs on the flat exchange, but tf_loop = 'fit'"),
    ({"compression": "powersgd", "grad_exchange": "optimizer"},
     "set grad_exchange = 'flat'"),
    ({"compression": "zip"}, "compression = 'zip' is not one of"),
    ({"powersgd_rank": 0}, "powersgd_rank = 0 is out of range"),
    ({"local_sgd_period": 8, "mode": "async"},
     "local_sgd_period = 8 cannot run with this config: the parameter server"),
    ({"local_sgd_period": 8, "reduction": "adasum"}, "set reduction = 'average'"),
    ({"local_sgd_period": 8, "framework": "tensorflow", "tf_loop": "fit"},
     "local_sgd_period = 8 cannot run with this config: set tf_loop = 'custom'"),
    ({"local_sgd_period": 4, "grad_exchange": "optimizer"},
     "local_sgd_period = 4 cannot run.*set grad_exchange = 'flat'"),
    ({"local_sgd_period": 4, "compression": "topk"}, "set compression = 'none'"),
    ({"local_sgd_period": 4, "epochs": 3, "local_sgd_start_epoch": 3},
     "local_sgd_start_epoch = 3 is not below epochs = 3.*use 0..2"),
    ({"local_sgd_start_epoch": 2}, "local_sgd_start_epoch is set but local SGD is off"),
    ({"local_sgd_weighted": True}, "local_sgd_weighted is set but local SGD is off"),
    ({"local_sgd_period": -1}, "local_sgd_period = -1 is out of range"),
])
def test_invalid_values_name_field_value_and_fix(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        RunConfig(**values)


def test_the_default_exchange_is_the_flat_buffer_unless_a_feature_needs_horovods_wrapper():
    assert RunConfig().grad_exchange == "auto" and RunConfig().exchange == "flat"
    assert RunConfig(framework="tensorflow").exchange == "flat"
    assert RunConfig(reduction="adasum").exchange == "optimizer"
    assert RunConfig(framework="tensorflow", tf_loop="fit").exchange == "optimizer"
    assert RunConfig(grad_exchange="optimizer").exchange == "optimizer"


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown key 'batchsize'.*Did you mean 'batch_size'"):
        RunConfig.from_dict({"batchsize": 3})


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        RunConfig.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.toml")
    table = tmp_path / "table.toml"
    table.write_text("[horovod]\nfusion_threshold_mb = 1\n")
    with pytest.raises(ConfigError, match=r"\[horovod\] is a table"):
        RunConfig.load(table)


@pytest.mark.parametrize("text, expected", [
    ('epochs = "ten"\n', "epochs = 'ten' has the wrong type: expected int, got str"),
    ("lr = -1\n", "lr = -1.0 is out of range: it must be greater than 0.0"),
    ('model = "vgg"\n', "model = 'vgg' is not one of"),
])
def test_a_bad_value_in_a_toml_file_names_the_file(tmp_path, text, expected):
    """Before: the error named the key and value but not the file they came from."""
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        RunConfig.load(path)
    assert str(e.value).startswith(f"config file {str(path)!r}: {expected}")
    typo = tmp_path / "typo.toml"
    typo.write_text("epochz = 3\n")
    with pytest.raises(ConfigError, match=f"unknown key 'epochz' in config file '{typo}'"):
        RunConfig.load(typo)


def test_cli_overrides_toml(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('model = "cnn"\nlr = 0.2\nepochs = 3\n')
    cfg = parse_train_args(["--config", str(f), "--lr", "0.3", "--no-shuffle"])
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.shuffle) == ("cnn", 0.3, 3, False)


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(RunConfig)} <= flags
    ns = parser.parse_args(["--batch-size", "7"])
    assert overrides_from_namespace(ns) == {"batch_size": 7}


def test_global_batch_divides_over_ranks():
    cfg = RunConfig(global_batch_size=64)
    assert cfg.per_rank_batch(4) == 16
    with pytest.raises(ConfigError, match="does not divide by 3 ranks"):
        cfg.per_rank_batch(3)
    with pytest.raises(ConfigError, match="smaller than the 128 ranks"):
        cfg.per_rank_batch(128)
