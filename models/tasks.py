"""The built-in models as tasks, written with the public task API (``harness.Task``).

``harness train --model cnn`` runs the task ``models.tasks:builtin``, which is what
``--task models.tasks:builtin`` would load: the built-in models take no path a user's task
cannot. Each task maps its weights to the canonical layout of ``models.base`` (PyTorch's), so
the PyTorch and Keras versions start from the same weights and can be compared weight by weight.
No framework is imported until a task's model is built.
"""

from __future__ import annotations

from typing import Any

from harness.config import RunConfig
from harness.data import Dataset, check_model_input, load_dataset
from harness.errors import ConfigError
from harness.task import Canonical, Task, Tasks
from models import config_options, default_classes, default_input_shape, get_spec, load_impl
from models.base import ModelSpec, from_keras_layout, to_keras_layout


def builtin(cfg: RunConfig) -> Tasks:
    """The task of ``cfg.model`` on ``cfg.dataset`` (both frameworks)."""
    lm = cfg.model == "gpt"
    shape = (cfg.seq_len,) if lm else default_input_shape(cfg.model)
    data = load_dataset(cfg.dataset, shape, default_classes(cfg.model), cfg.data_path,
                        cfg.synthetic_samples, cfg.seed, tokens=lm, text_tokens=cfg.text_tokens)
    check_model_input(cfg.model, data.input_shape, data)
    if lm and data.input_shape != shape:
        raise ConfigError(f"{data.name} holds windows of {data.input_shape[0]} tokens but "
                          f"seq_len = {cfg.seq_len}: set seq_len = {data.input_shape[0]}")
    try:
        spec = get_spec(cfg.model, data.input_shape, data.num_classes, **config_options(cfg))
    except ValueError as e:
        raise ConfigError(f"model {cfg.model!r} does not fit dataset {data.name!r}: {e}") from None
    return Tasks(torch=torch_task(spec, data), tensorflow=keras_task(spec, data))


def _common(spec: ModelSpec, data: Dataset) -> dict[str, Any]:
    """Classification (language models: of the next token at every position)."""
    return {"name": spec.name, "data": data, "loss_name": "cross_entropy",
            "flops_per_sample": spec.flops_per_sample,
            "tokens_per_sample": spec.tokens_per_sample}


def torch_task(spec: ModelSpec, data: Dataset) -> Task:
    """Classification with cross-entropy and accuracy; state_dict names are canonical."""

    def model():
        return load_impl(spec.name, "torch").build(spec)

    def loss(out, y):
        import torch.nn.functional as F

        # (batch, classes) and (batch,), or per token (batch, seq_len, vocab) and (batch, seq_len)
        return F.cross_entropy(out.flatten(0, -2), y.flatten())

    def acc(out, y):
        return (out.argmax(-1) == y).float().mean()

    names = [p.name for p in spec.params]
    same = Canonical(init=spec.init_weights,
                     to_framework=lambda model, w: {n: w[n] for n in names},
                     from_framework=lambda model, w: {n: w[n] for n in names})
    return Task(framework="torch", model=model, loss=loss, metrics={"acc": acc},
                canonical=same, **_common(spec, data))


def keras_task(spec: ModelSpec, data: Dataset) -> Task:
    """The same in Keras: kernels are transposed to and from the canonical layout."""
    kinds = {p.name: p.kind for p in spec.params}

    def model():
        from harness.backends.horovod_tf import keras_module

        return load_impl(spec.name, "tensorflow").build(spec, keras_module())

    def loss(out, y):
        import tensorflow as tf

        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(y, tf.int64), logits=out))   # model.fit hands labels over as float

    def acc(out, y):
        import tensorflow as tf

        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out, -1), tf.cast(y, tf.int64)),
                                      tf.float32))

    def to_framework(model, w: dict) -> dict:
        from harness.backends.horovod_tf import variable_name
        from models.tf_layers import canonical_variables

        return {variable_name(v): to_keras_layout(kinds[n], w[n])
                for n, v in canonical_variables(model).items()}

    def from_framework(model, w: dict) -> dict:
        from harness.backends.horovod_tf import variable_name
        from models.tf_layers import canonical_variables

        return {n: from_keras_layout(kinds[n], w[variable_name(v)])
                for n, v in canonical_variables(model).items()}

    return Task(framework="tensorflow", model=model, loss=loss, metrics={"acc": acc},
                canonical=Canonical(spec.init_weights, to_framework, from_framework),
                **_common(spec, data))
