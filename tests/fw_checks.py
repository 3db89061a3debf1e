"""Framework-specific checks, run as ``python tests/fw_checks.py FRAMEWORK CHECK [ARGS]`` so
that every process imports one framework only. Each check prints one JSON line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from harness.backends.base import create  # noqa: E402
from harness.config import RunConfig  # noqa: E402
from harness.env import World  # noqa: E402
from harness.driver import load_task_data  # noqa: E402
from harness.ps.plan import even_shard  # noqa: E402
from models import REGISTRY, config_options, get_spec, load_impl  # noqa: E402
from models.base import to_keras_layout  # noqa: E402

WORLD = World(0, 1, 0, 1)
SMALL_SHAPES = {"mlp": (8, 8, 1), "cnn": (8, 8, 1), "resnet20": (32, 32, 3),
                "resnet50": (64, 64, 3), "gpt": (16,)}
#: a gpt small enough for fixed-batch checks, its vocabulary bytes
GPT_SMALL = {"gpt_layers": 2, "gpt_dim": 32, "gpt_heads": 4, "seq_len": 16}


def framework_names_and_shapes(fw: str, spec) -> dict[str, tuple]:
    if fw == "torch":
        model = load_impl(spec.name, "torch").build(spec)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}, \
            sum(p.numel() for p in model.parameters() if p.requires_grad)
    import keras

    from models.base import from_keras_layout
    from models.tf_layers import canonical_variables

    model = load_impl(spec.name, "tensorflow").build(spec, keras)
    kinds = {p.name: p.kind for p in spec.params}
    shapes = {k: tuple(from_keras_layout(kinds[k], np.empty(v.shape)).shape)
              for k, v in canonical_variables(model).items()}
    return shapes, int(sum(np.prod(v.shape) for v in model.trainable_variables))


def check_models(fw: str) -> dict:
    out = {}
    for name in REGISTRY:
        spec = get_spec(name) if name != "resnet50" else get_spec(name, (224, 224, 3), 1000)
        shapes, count = framework_names_and_shapes(fw, spec)
        expected = {p.name: p.shape for p in spec.params}
        out[name] = {"framework_params": int(count), "spec_params": spec.num_parameters,
                     "same_names_and_shapes": shapes == expected}
    return out


def check_forward(fw: str, name: str, out_path: str) -> dict:
    rng = np.random.default_rng(1)
    if name == "gpt":          # token ids in, (4, seq_len, vocab) logits out
        spec = get_spec(name, SMALL_SHAPES[name], 256, layers=2, dim=32, heads=4)
        x = rng.integers(0, 256, (4, *spec.input_shape), dtype=np.int64)
    else:
        spec = get_spec(name, SMALL_SHAPES[name], 10)
        x = rng.standard_normal((4, *spec.input_shape)).astype(np.float32)
    w = spec.init_weights(3)
    if fw == "torch":
        import torch

        m = load_impl(name, "torch").build(spec)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=False)
        m.eval()
        with torch.no_grad():
            logits = m(torch.from_numpy(x)).numpy()
    else:
        import keras

        from models.tf_layers import canonical_variables

        m = load_impl(name, "tensorflow").build(spec, keras)
        for p in spec.params:
            canonical_variables(m)[p.name].assign(to_keras_layout(p.kind, w[p.name]))
        logits = np.asarray(m(x, training=False))
    np.save(out_path, logits)
    return {"shape": list(logits.shape)}


def _backend(fw: str, **cfg_kw):
    cfg = RunConfig(framework=fw, **cfg_kw)
    task, data = load_task_data(cfg)
    spec = get_spec(cfg.model, data.input_shape, data.num_classes, **config_options(cfg))
    b = create(cfg, WORLD, "local")
    b.setup(task, data.x_train[:2], data.y_train[:2], cfg.lr)
    return b, data, spec


def check_backend(fw: str) -> dict:
    """State round trips and knobs of the local backend."""
    out = {}
    b, data, spec = _backend(fw, model="cnn", optimizer="sgd", momentum=0.9)
    x, y = data.x_train[:32], data.y_train[:32]
    w0 = b.get_weights()
    canonical = b.canonical_weights()
    out["weights_round_trip"] = all(np.array_equal(canonical[k], v) for k, v in
                                    spec.init_weights(0).items())
    b.set_lr(0.0)
    b.train_step(x, y)
    out["lr_zero_keeps_weights"] = all(np.array_equal(w0[k], v) for k, v in
                                       b.get_weights().items())
    b.set_lr(0.05)
    for i in range(2):
        b.train_step(data.x_train[32 * i:32 * (i + 1)], data.y_train[32 * i:32 * (i + 1)])
    arrays, meta = b.get_optimizer_state()
    weights = b.get_weights()
    b2, _, _ = _backend(fw, model="cnn", optimizer="sgd", momentum=0.9)
    b2.set_weights(weights)
    b2.set_optimizer_state(arrays, json.loads(json.dumps(meta)))
    b2.set_lr(0.05)
    xs, ys = data.x_train[64:96], data.y_train[64:96]
    r1, r2 = b.train_step(xs, ys), b2.train_step(xs, ys)
    w1, w2 = b.get_weights(), b2.get_weights()
    out["optimizer_state_round_trip"] = r1.loss == r2.loss and all(
        np.array_equal(w1[k], w2[k]) for k in w1)
    if fw == "tensorflow":
        # a checkpoint from before TorchSGD holds Keras' velocity, -lr x the buffer at a
        # constant learning rate (here 0.05): it resumes as the buffer, with a warning
        momentum = [i for i, n in enumerate(meta["names"]) if n.endswith("_momentum")]
        old = {k: a * np.float32(-0.05) if int(k) in momentum else a for k, a in arrays.items()}
        old_meta = {k: v for k, v in meta.items() if k != "momentum_buffer"}
        b6, _, _ = _backend(fw, model="cnn", optimizer="sgd", momentum=0.9)
        b6.set_optimizer_state(old, old_meta)
        back, _ = b6.get_optimizer_state()
        out["keras_velocity_resumes_as_the_buffer"] = bool(momentum) and all(
            np.allclose(back[k], arrays[k], rtol=1e-6, atol=1e-9) for k in arrays)
    if fw == "torch":
        # a checkpoint from before the fused kernels (fused: None) resumes fused, as this run
        # chose, with Adam's step count where a fused step wants it
        b4, _, _ = _backend(fw, model="cnn", optimizer="adam")
        b4.train_step(x, y)
        arrays, meta = b4.get_optimizer_state()
        for g in meta["param_groups"]:
            g["fused"] = None
        b5, _, _ = _backend(fw, model="cnn", optimizer="adam")
        b5.set_optimizer_state(arrays, json.loads(json.dumps(meta)))
        group, p0 = b5.optimizer.param_groups[0], b5.params[0]
        out["restored_optimizer_stays_fused"] = group["fused"] is True and \
            b5.optimizer.state[p0]["step"].device == p0.device
        b5.train_step(x, y)
        import types

        import torch

        from harness.backends.horovod_torch import TorchBackend

        def fused(model):
            return TorchBackend._fused(types.SimpleNamespace(
                model=model, params=list(model.parameters())))
        out["sparse_gradients_keep_the_unfused_kernels"] = \
            fused(torch.nn.Embedding(10, 4, sparse=True)) is None and \
            fused(torch.nn.Embedding(10, 4)) is True
    flat = b.get_flat_params()
    b2.set_flat_params(flat * 0 + 1)
    b2.set_flat_params(flat)
    out["flat_params_round_trip"] = bool(np.array_equal(b2.get_flat_params(), flat))
    res, grad = b.compute_gradients(xs, ys)
    out["gradient_size"] = int(grad.size) == spec.num_parameters
    out["gradient_finite"] = bool(np.isfinite(grad).all())
    # skip policy: a NaN batch is not applied
    b3, _, _ = _backend(fw, model="mlp", nan_policy="skip")
    before = b3.get_weights()
    res = b3.train_step(np.full_like(xs, np.nan), ys)
    out["nan_step_skipped"] = (not res.applied) and all(
        np.array_equal(before[k], v) for k, v in b3.get_weights().items())
    if fw == "torch":       # one non-finite value in one parameter's gradient, loss finite
        b3.train_step(xs, ys)
        seen = [b3.grads_finite()]
        last = b3.params[-1].grad
        for bad in (float("nan"), float("inf")):
            keep = last.view(-1)[0].item()
            last.view(-1)[0] = bad
            seen.append(b3.grads_finite())
            last.view(-1)[0] = keep
        seen.append(b3.grads_finite())
        out["a_non_finite_gradient_is_seen"] = seen == [True, False, False, True]
    return out


def check_fidelity(fw: str, out_path: str) -> dict:
    """50 SGD steps of mlp from the seeded initial weights on fixed batches, the learning rate
    warming up over the first 20 (as the harness's warm-up and its scaling with the world size
    change it): the losses."""
    b, data, spec = _backend(fw, model="mlp", lr=0.05, momentum=0.9)
    losses = []
    for i in range(50):
        b.set_lr(0.05 * min(1.0, (i + 1) / 20))
        j = (i * 32) % (len(data.x_train) - 32)
        losses.append(b.train_step(data.x_train[j:j + 32], data.y_train[j:j + 32]).loss)
    np.savez(out_path, **b.canonical_weights())
    return {"losses": losses}


def check_gpt_fidelity(fw: str, optimizer: str, out_path: str) -> dict:
    """gpt on pysource from the seeded initial weights: 50 steps of ``optimizer`` on fixed
    batches (the losses, the first one before any update) and the final weights."""
    lr = 0.003 if optimizer == "adam" else 0.1
    b, data, spec = _backend(fw, model="gpt", dataset="pysource", text_tokens=16 * 32 * 50,
                             optimizer=optimizer, lr=lr, momentum=0.9, **GPT_SMALL)
    losses = []
    for i in range(50):
        losses.append(b.train_step(data.x_train[32 * i:32 * (i + 1)],
                                   data.y_train[32 * i:32 * (i + 1)]).loss)
    np.savez(out_path, **b.canonical_weights())
    return {"losses": losses}


def check_horovod(fw: str) -> dict:
    """Under horovodrun -np 2: allreduce, broadcast and (torch) the patched zero_grad."""
    out: dict = {}
    if fw == "torch":
        import horovod.torch as hvd
        import torch

        hvd.init()
        t = torch.full((5,), float(hvd.rank() + 1))
        out["allreduce_sum"] = hvd.allreduce(t, op=hvd.Sum).tolist()
        out["allreduce_avg"] = hvd.allreduce(t, op=hvd.Average).tolist()
        out["broadcast"] = hvd.broadcast(t, root_rank=0).tolist()
        model = torch.nn.Linear(3, 2)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters())
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["zero_grad_set_to_none"] = all(p.grad is None for p in model.parameters())
        opt.zero_grad(set_to_none=False)
    else:
        import horovod.tensorflow as hvd
        import tensorflow as tf

        hvd.init()
        t = tf.fill([5], float(hvd.rank() + 1))
        out["allreduce_sum"] = hvd.allreduce(t, op=hvd.Sum).numpy().tolist()
        out["allreduce_avg"] = hvd.allreduce(t, op=hvd.Average).numpy().tolist()
        out["broadcast"] = hvd.broadcast(t, root_rank=0).numpy().tolist()
    out["size"] = hvd.size()
    out["rank"] = hvd.rank()
    out["mpi_built"] = bool(hvd.mpi_built())
    out["gloo_built"] = bool(hvd.gloo_built())
    if hvd.rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return out


def check_broadcast_state(fw: str, gradient_path: str) -> dict:
    """Under mpirun -np 2: the backend's broadcast_state gives every rank rank 0's weights and
    optimizer state. Rank r first takes r + 1 local steps (no exchange), so weights, moments and
    step counters all differ, as after a resume where rank 0 alone restored them. Returns, on
    rank 1, the arrays that differed from rank 0's before and those that still differ after."""
    from harness.env import detect_world

    cfg = RunConfig(framework=fw, model="cnn", optimizer="adam", seed=0)
    task, data = load_task_data(cfg)
    b = create(cfg, detect_world(), gradient_path)
    world = b.init_distributed()
    b.setup(task, data.x_train[:2], data.y_train[:2], cfg.lr)
    for step in range(world.rank + 1):
        lo = 16 * (2 * step + world.rank)
        b.local_step(data.x_train[lo:lo + 16], data.y_train[lo:lo + 16])

    def state() -> dict[str, np.ndarray]:
        arrays, meta = b.get_optimizer_state()
        names = meta.get("names") or list(arrays)          # Keras: the variables' paths
        return {**{f"weights/{k}": v for k, v in b.get_weights().items()},
                **{f"optimizer/{n}": arrays[k] for n, k in zip(names, arrays)}}

    def differing(mine: dict[str, np.ndarray]) -> list[str]:
        """The names whose array is not rank 0's (rank 0's arrays reach every rank as a sum
        of its own and zeros)."""
        out = []
        for name, a in mine.items():
            a = np.asarray(a, np.float64)
            root = b.allreduce_host(a.reshape(-1) * (world.rank == 0), "sum")
            if not np.array_equal(root, a.reshape(-1)):
                out.append(name)
        return out

    before = differing(state())
    b.broadcast_state(resumed=True)
    after = differing(state())
    b.shutdown()
    if world.rank != 1:      # one line: mpirun may interleave two ranks' output mid-line
        sys.stdout = open(os.devnull, "w")
    return {"rank": world.rank, "size": world.size, "differed_before": before,
            "differ_after": after}


def check_tf_exchange(fw: str) -> dict:
    """Under mpirun -np 2: TensorFlow's flat exchange where one gradient (mlp's 2048 x 128
    kernel, 1 MiB) has an allreduce of its own and the others share the flat buffer. Each rank
    makes distinct gradients inside the graph (as the backward pass does: buffers that nothing
    else holds); returns, on rank 0, which gradients went apart, the Horovod allreduces in the
    exchange's graph, whether every reduced gradient is the exact float32 sum of both ranks'
    times the gradient_predivide_factor (4: Horovod's postscale on each allreduce) and Horovod's
    fusion threshold."""
    import tensorflow as tf

    from harness.backends.horovod_tf import variable_name
    from harness.data import Data
    from harness.env import detect_world
    from models.tasks import keras_task

    cfg = RunConfig(framework=fw, model="mlp", allreduce="horovod", threads_per_rank=1,
                    gradient_predivide_factor=4.0)
    b = create(cfg, detect_world(), "horovod")
    world = b.init_distributed()
    x, y = np.zeros((2, 2048), np.float32), np.zeros(2, np.int64)
    b.setup(keras_task(get_spec("mlp", (2048,), 10), Data(train=(x, y), test=(x, y))), x, y, 0.1)
    shapes = [tuple(v.shape) for v in b.tf_trainable]

    def grads_of(rank):
        """Rank ``rank``'s gradients: its own constant plus a ramp, in float32."""
        return [np.float32((rank + 1) * (i + 1)) +
                np.arange(np.prod(s), dtype=np.float32).reshape(s) * np.float32(1e-3)
                for i, s in enumerate(shapes)]

    first = tf.Variable(float(world.rank + 1))        # a variable: no constant folding

    def grads(wide=()):
        """This rank's gradients in the graph; those in ``wide`` in float64."""
        return [tf.cast(g, tf.float64) if i in wide else g for i, g in enumerate(
            first * (i + 1) + tf.reshape(tf.range(int(np.prod(s)), dtype=tf.float32) * 1e-3, s)
            for i, s in enumerate(shapes))]

    out: dict = {"own": [variable_name(b.trainable[i]) for i in b._own_allreduces]}
    expected = [(a + c) * np.float32(4) for a, c in zip(grads_of(0), grads_of(1))]
    # as the model has them, and with a small float64 gradient among them (a layer of its own
    # dtype: one flat buffer per dtype)
    for key, wide in (("", ()), ("mixed_", (1,))):
        exchange = tf.function(lambda: b._flat_allreduce(grads(wide), b.hvd.Compression.none))
        reduced = exchange()
        graph = exchange.get_concrete_function().graph
        out[key + "allreduces"] = sorted(op.name for op in graph.get_operations()
                                         if op.type == "HorovodAllreduce")
        wide_expected = [(a.astype(np.float64) + c.astype(np.float64)) * 4 if i in wide else e
                         for i, (a, c, e) in enumerate(zip(grads_of(0), grads_of(1), expected))]
        out[key + "exact"] = [bool(np.array_equal(r.numpy(), e))
                              for r, e in zip(reduced, wide_expected)]
        out[key + "dtypes"] = [r.dtype.name for r in reduced]
    out.update(fusion_threshold=os.environ.get("HOROVOD_FUSION_THRESHOLD"), gpu=b.gpu)
    b.shutdown()
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")
    return out


def check_serial_sgd(fw: str, out_path: str, steps: str, *flags: str) -> dict:
    """The reference for a one-worker parameter-server run: the same gradients and the servers'
    SGD applied in one process, in order."""
    from harness.ps.optim import SGDMomentum
    from harness.config import parse_train_args
    from harness.data import Sharder

    cfg = parse_train_args(["--framework", fw, *flags])
    task, data = load_task_data(cfg)
    b = create(cfg, WORLD, "local")
    b.setup(task, data.x_train[:2], data.y_train[:2], cfg.lr)
    params = b.get_flat_params()
    opt = SGDMomentum(params, cfg.momentum, cfg.weight_decay)
    sharder = Sharder(len(data.x_train), cfg.batch_size, 0, 1, cfg.seed, cfg.shuffle)
    shards = [even_shard(len(params), k, cfg.ps_servers) for k in range(cfg.ps_servers)]
    residual = np.zeros_like(params)
    for clock in range(int(steps)):
        epoch, step = divmod(clock, sharder.steps_per_epoch)
        x, y = data.train.batch(sharder.indices(epoch, step))
        _, grad = b.compute_gradients(x, y)
        if cfg.compression != "none":      # each shard's push, with the worker's residual
            v = grad + residual
            grad = np.concatenate([pushed(cfg, v[a:c]) for a, c in shards])
            residual = v - grad
        opt.step(grad, cfg.lr)
        b.set_flat_params(params)
    np.save(out_path, params)
    return {"steps": int(steps)}


def pushed(cfg, v: np.ndarray) -> np.ndarray:
    """What a server applies of a worker's compressed push of ``v``, written here apart from
    harness/compress.py: top-k keeps the k largest magnitudes; int8 rounds each 512 values to
    127 steps of their largest magnitude."""
    if cfg.compression == "topk":
        k = max(1, int(np.ceil(cfg.compression_ratio * len(v))))
        keep = np.argsort(-np.abs(v), kind="stable")[:k]
        out = np.zeros_like(v)
        out[keep] = v[keep]
        return out
    rows = np.pad(v, (0, -len(v) % 512)).reshape(-1, 512)
    scale = np.abs(rows).max(axis=1, keepdims=True) / np.float32(127)
    q = np.clip(np.round(rows / np.where(scale > 0, scale, 1)), -127, 127)
    return (q * scale).reshape(-1)[:len(v)].astype(np.float32)


def check_late_rank(fw: str, rounds: str = "6") -> dict:
    """Under horovodrun -np 2 with HOROVOD_WAKE_ON_ENQUEUE=1 and a long HOROVOD_CYCLE_TIME C:
    every round rank 0 enqueues its tensor 0.8 C after both ranks met, rank 1 at 1.2 C. Rank 0's
    enqueue wakes its thread, which negotiates with rank 1's thread when that one's idle cycle
    ends (C); rank 1's tensor is missing then. Returns rank 1's allreduce times from its
    enqueue: our patch 0007 keeps them short; without it rank 0's thread sleeps until 1.8 C."""
    import time

    import horovod.torch as hvd
    import torch

    hvd.init()
    cycle = float(os.environ["HOROVOD_CYCLE_TIME"]) / 1000
    waits = []
    for i in range(int(rounds)):
        hvd.allreduce(torch.zeros(1), name=f"sync.{i}")       # both ranks start together
        time.sleep((0.8, 1.2)[hvd.rank()] * cycle)
        t0 = time.perf_counter()
        hvd.allreduce(torch.ones(1000), name=f"grad.{i}")
        waits.append(time.perf_counter() - t0)
    return {"late_rank_waits_s": hvd.allgather_object(waits)[1], "rank": hvd.rank()}


#: a network's trainable shapes in PyTorch's layout and in Keras's (matrices transposed)
COMPRESS_SHAPES = {"torch": ((24, 40), (24,), (10, 24), (10,)),
                   "tensorflow": ((40, 24), (24,), (24, 10), (10,))}


def compress_inputs(fw: str, method: str, steps: int = 3) -> list[np.ndarray]:
    """The same gradients, one per step: for PowerSGD in ``fw``'s layout (Keras's matrices
    transposed); the other methods see a flat vector only, the same one in both."""
    out = []
    for t in range(steps):
        parts = []
        rng = np.random.default_rng(t)
        for shape in COMPRESS_SHAPES["torch"]:
            a = rng.standard_normal(shape).astype(np.float32)
            keras = fw == "tensorflow" and method == "powersgd"
            parts.append((a.T if keras else a).ravel())
        out.append(np.concatenate(parts))
    return out


def check_compress(fw: str, out_path: str, device: str = "cpu") -> dict:
    """Every compression method, 3 steps with its state, on one rank with this framework's
    operations (TensorFlow's inside tf.function, as the backend runs them; PyTorch's on
    ``device``): the outputs."""
    from harness import compress as C

    shapes = COMPRESS_SHAPES[fw]
    n = sum(int(np.prod(s)) for s in shapes)
    arrays, sent = {}, {}
    for method in C.CLASSES:
        if fw == "torch":
            import torch

            from harness.backends.ops_torch import TorchOps

            c = C.make(method, TorchOps(device=device), n, shapes=shapes, ratio=0.05, rank=3,
                       seed=7)
            run = lambda v: c.exchange(torch.from_numpy(v).to(device)).cpu().numpy()  # noqa
        else:
            import tensorflow as tf

            from harness.backends.ops_tf import TFOps

            c = C.make(method, TFOps(), n, shapes=shapes, ratio=0.05, rank=3, seed=7,
                       channels_last=True)
            graph = tf.function(c.exchange)
            run = lambda v: graph(tf.constant(v)).numpy()  # noqa: E731
        for t, v in enumerate(compress_inputs(fw, method)):
            arrays[f"{method}/{t}"] = run(v)
        sent[method] = c.payload_bytes
        for name, a in c.state_arrays().items():
            arrays[f"{method}/state/{name}"] = a
    np.savez(out_path, **arrays)
    return {"payload_bytes": sent}


#: per method, what the accuracy test sets besides it: random-k picks its values blind, so
#: it needs a large share (at 1% its delayed residuals make the digits cnn diverge); local SGD
#: averages weights every 8 steps, post-local SGD every 16 after 2 dense epochs (of 8)
METHOD_SETTINGS = {"randomk": {"compression_ratio": 0.25},
                   "local-sgd": {"compression": "none", "local_sgd_period": 8},
                   "post-local-sgd": {"compression": "none", "local_sgd_period": 16,
                                      "local_sgd_start_epoch": 2}}


def check_compressed_training(fw: str, out_dir: str, methods: str) -> dict:
    """Under horovodrun -np 2: the README's main job (digits cnn) once per method, in this one
    launch (Horovod starts and shuts down per run; MPI stays up through mpi4py): each run's
    final test accuracy and the bytes rank 0 sent per step."""
    from mpi4py import MPI        # first: MPI then outlives each run's hvd.shutdown()

    from harness.train import run

    out = {}
    for method in methods.split(","):
        cfg = RunConfig.load(Path(__file__).resolve().parents[1] / "configs" /
                             "compare_digits.toml",
                             {"framework": fw, "compression": method, "out_dir": out_dir,
                              "run_name": method, "tensorboard": False,
                              **METHOD_SETTINGS.get(method, {})})
        if run(cfg) != 0:
            raise SystemExit(f"{method}: the run did not finish")
        if MPI.COMM_WORLD.rank != 0:         # rank 0 writes the summary
            continue
        summary = json.loads((Path(out_dir) / method / "summary.json").read_text())
        out[method] = {"acc": summary["final_eval_acc"],
                       "sent_bytes": summary["sent_bytes_per_step"],
                       "dense_bytes": summary["dense_bytes_per_step"],
                       "consistent": summary["ranks_consistent"]}
    return {"compressed_training": out} if MPI.COMM_WORLD.rank == 0 else {"rank": 1}


CHECKS = {"compress": check_compress, "compressed_training": check_compressed_training,
          "models": check_models, "forward": check_forward, "backend": check_backend,
          "fidelity": check_fidelity, "gpt_fidelity": check_gpt_fidelity,
          "horovod": check_horovod, "broadcast_state": check_broadcast_state,
          "serial_sgd": check_serial_sgd, "late_rank": check_late_rank,
          "tf_exchange": check_tf_exchange}

if __name__ == "__main__":
    fw, check, *args = sys.argv[1:]
    print(json.dumps(CHECKS[check](fw, *args)), flush=True)
