"""PyTorch backends: Horovod (DistributedOptimizer), mpi4py flat allreduce, and local.

PyTorch side of the contract: parameters and optimizer state are broadcast *before* step 1,
and the optimizer is wrapped by ``hvd.DistributedOptimizer`` with ``named_parameters`` so every
rank reduces tensors under the same names.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from harness.backends.base import Backend, BackendInfo, StepResult
from harness.backends.comm import HorovodComm, LocalComm, MPIComm
from harness.backends.common import (FlatLayout, check_loss_tensor, check_metric, check_scalar,
                                     check_weight_names, initial_canonical_weights, misfit,
                                     seed_generators)
from harness.env import World
from harness.task import Task, TaskError


def cuda_available() -> bool:
    """PyTorch sees a CUDA device (``allreduce = "auto"`` keeps Horovod's NCCL for it)."""
    return bool(torch.cuda.is_available())


class TorchBackend(Backend):
    """Model, optimizer and steps; subclasses decide how gradients travel."""

    framework = "torch"
    broadcast_after_first_step = False

    def __init__(self, cfg, world: World, threads: int | None = None) -> None:
        super().__init__(cfg, world, threads)
        torch.set_num_threads(self.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:   # already fixed by an earlier parallel op in this process
            pass
        self.device = torch.device("cpu")
        self._flat_grad: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []

    # --- building ---
    def setup(self, task: Task, x: np.ndarray, y: np.ndarray, lr: float) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.world.gpu(torch.cuda.device_count()))
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.task = task
        seed_generators(self.cfg.seed)         # the user's own initialisation, the same each run
        torch.manual_seed(self.cfg.seed)
        model = task.model()
        if not isinstance(model, torch.nn.Module):
            raise TaskError(f"task {task.name!r}: model() returned {type(model).__name__}, not a "
                            "torch.nn.Module: return the model (framework = 'torch')")
        self.model = model.to(self.device)
        self._state = {k: v for k, v in self.model.state_dict().items()
                       if not k.endswith("num_batches_tracked")}
        self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise TaskError(f"task {task.name!r}: the model has no trainable parameters")
        self.params = [p for _, p in self.named_params]
        self.layout = FlatLayout.of([(n, tuple(p.shape)) for n, p in self.named_params])
        if task.canonical is not None:
            shapes = {k: tuple(v.shape) for k, v in self._state.items()}
            self.set_weights(initial_canonical_weights(task, self.model, self.cfg.seed, shapes))
        self._check_task(x, y)
        self.optimizer = self.wrap_optimizer(self._make_optimizer(lr))
        self._make_compressor()
        self.model.train()

    @torch.no_grad()
    def _check_task(self, x: np.ndarray, y: np.ndarray) -> None:
        """The model, loss and metrics fit together on the sample batch (else a TaskError)."""
        task, out = self.task, None
        xb, yb = self._batch(x, y)
        self.model.eval()
        try:
            what = "model(x)"
            out = self.model(xb)
            what = "loss(model(x), y)"
            loss = task.loss(out, yb)
            check_loss_tensor(task, loss, isinstance(loss, torch.Tensor), "torch.Tensor")
            check_scalar(task, "loss(model(x), y)", tuple(loss.shape), len(x))
            for name, fn in task.metrics.items():
                what = f"metric {name!r}"
                check_metric(task, name, torch.as_tensor(fn(out, yb)).float().cpu().numpy(),
                             len(x))
        except TaskError:
            raise
        except Exception as e:   # noqa: BLE001 - a misfit is one line; anything else is theirs
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            error = misfit(task, what, e, x, y, shape)
            if error is None:
                raise
            raise error from e
        finally:
            self.model.train()

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        c = self.cfg
        # PyTorch's fused kernels where every parameter allows them: one pass over all the
        # parameters instead of a few tensor ops per parameter (the main job's cnn: the SGD
        # step 0.31 -> 0.21 ms; docs/benchmarks.md), the same update to rounding
        fused = self._fused()
        if c.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=lr, momentum=c.momentum,
                                   weight_decay=c.weight_decay, fused=fused)
        return torch.optim.Adam(self.params, lr=lr, weight_decay=c.weight_decay, eps=1e-8,
                                fused=fused)

    def _fused(self) -> bool | None:
        """Fused kernels (True), or torch's default (None) where a parameter is not floating
        point, lives on another device, or gets sparse gradients, which they do not take."""
        sparse = any(getattr(m, "sparse", False) is True for m in self.model.modules())
        ok = not sparse and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in self.params)
        return True if ok else None

    def wrap_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return opt

    def _use_flat_grads(self) -> torch.Tensor:
        """Point every .grad at a slice of one contiguous buffer (zeroed with one memset)."""
        if self._flat_grad is None:
            self._flat_grad = torch.zeros(self.layout.total, device=self.device)
            self._grad_views = [self._flat_grad[off:off + p.numel()].view_as(p)
                                for p, off in zip(self.params, self.layout.offsets)]
        # an identity check per parameter (making the views anew cost ~60 us a step)
        for p, view in zip(self.params, self._grad_views):
            if p.grad is not view:
                p.grad = view
        return self._flat_grad

    # --- steps ---
    def _batch(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xb, yb = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.type != "cpu":
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        return xb, yb

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    #: gradients come out multiplied by this (the flat Horovod exchange pre-divides here)
    grad_scale = 1.0

    def _metric_sums(self, out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Each task metric summed over the batch (its mean x n), without gradients."""
        with torch.no_grad():
            return [torch.as_tensor(fn(out, y), dtype=torch.float32, device=self.device) * len(y)
                    for fn in self.task.metrics.values()]

    def _forward_backward(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
        """Local gradients of the batch mean loss, accumulated over backward_passes_per_step
        micro-batches (each loss scaled by its share so the sum is the mean over the whole
        batch). Returns the loss and the metric sums (one device-to-host copy)."""
        xb, yb = self._batch(x, y)
        k, scale, loss_fn = self.cfg.backward_passes_per_step, self.grad_scale, self.task.loss
        chunks = zip(xb.chunk(k), yb.chunk(k)) if k > 1 else [(xb, yb)]
        total: torch.Tensor | None = None
        sums: list[torch.Tensor] = []
        for xc, yc in chunks:
            out = self.model(xc)
            loss = loss_fn(out, yc)
            if k > 1:
                loss = loss * (len(xc) / len(xb))
            (loss * scale if scale != 1.0 else loss).backward()
            ms = self._metric_sums(out, yc)
            total = loss.detach() if total is None else total + loss.detach()
            sums = ms if not sums else [a + b for a, b in zip(sums, ms)]
        assert total is not None
        values = torch.stack([total.float(), *sums]).tolist()
        return values[0], dict(zip(self.task.metrics, values[1:]))

    def grads_finite(self) -> bool:
        if self._flat_grad is not None:
            return bool(torch.isfinite(self._flat_grad.sum()))
        grads = [p.grad for p in self.params if p.grad is not None]
        if self._amp_check:
            # GradScaler's check: one fused pass over all the gradients of a device and dtype
            # (x 1.0, in place: the same values), instead of a sum per parameter (the main
            # job's cnn: 8.5 against 38 us a step; resnet20: 55 against 204)
            try:
                if self._amp_scalars is None:
                    self._amp_scalars = (torch.zeros(1, device=self.device),
                                         torch.ones(1, device=self.device))
                found, one = self._amp_scalars
                found.zero_()
                groups: dict[tuple, list[torch.Tensor]] = {}
                for g in grads:
                    groups.setdefault((g.device, g.dtype), []).append(g)
                for gs in groups.values():
                    torch._amp_foreach_non_finite_check_and_unscale_(gs, found, one)
                return not bool(found)
            except (RuntimeError, NotImplementedError, AttributeError):
                self._amp_check = False     # sparse gradients, another device: sum them
        return bool(torch.isfinite(torch.stack([g.sum() for g in grads]).sum()))

    #: whether grads_finite may use GradScaler's fused check, and its two scalars
    _amp_check = True
    _amp_scalars: tuple[torch.Tensor, torch.Tensor] | None = None

    def exchange_and_step(self) -> bool:
        """Reduce gradients over ranks and apply them; False if the step was skipped. The
        wait for the reduced gradients runs under ``exchange_timer``."""
        if not self.grads_finite():     # skipped, or (nan_policy = stop) the run stops
            return False
        self.optimizer.step()
        return True

    _exchange_s = 0.0

    @contextmanager
    def exchange_timer(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self._exchange_s += time.perf_counter() - t

    def train_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        self._exchange_s = 0.0
        self.zero_grad()
        loss, metrics = self._forward_backward(x, y)
        applied = self.exchange_and_step()
        return StepResult(loss, metrics, applied, exchange_s=self._exchange_s)

    def local_step(self, x: np.ndarray, y: np.ndarray) -> StepResult:
        scale, self.grad_scale = self.grad_scale, 1.0     # this rank's own mean gradient
        try:
            self.zero_grad()
            loss, metrics = self._forward_backward(x, y)
        finally:
            self.grad_scale = scale
        applied = TorchBackend.exchange_and_step(self)    # the update, without the exchange
        return StepResult(loss, metrics, applied, exchange_s=0.0)

    @torch.no_grad()
    def average_params(self, share: float) -> None:
        flat = torch.cat([p.reshape(-1) for p in self.params])
        if share != 1.0:
            flat.mul_(share)
        flat = self._sum_params(flat)
        for p, off in zip(self.params, self.layout.offsets):
            p.copy_(flat[off:off + p.numel()].view_as(p))

    @torch.no_grad()
    def eval_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
        self.model.eval()
        try:
            xb, yb = self._batch(x, y)
            out = self.model(xb)
            loss = self.task.loss(out, yb).float() * len(yb)
            values = torch.stack([loss, *self._metric_sums(out, yb)]).tolist()
            return values[0], dict(zip(self.task.metrics, values[1:]))
        finally:
            self.model.train()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- state ---
    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self._state.items()}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        check_weight_names({k: tuple(v.shape) for k, v in self._state.items()}, weights,
                           "weights")
        for k, t in self._state.items():
            t.copy_(torch.from_numpy(np.ascontiguousarray(weights[k])))

    def rng_parts(self) -> dict[str, np.ndarray]:
        parts = {**super().rng_parts(), "torch": torch.get_rng_state().numpy().copy()}
        if self.device.type == "cuda":
            parts["torch_cuda"] = torch.cuda.get_rng_state(self.device).numpy().copy()
        return parts

    def set_rng_parts(self, parts: dict[str, np.ndarray]) -> None:
        super().set_rng_parts(parts)
        torch.set_rng_state(torch.from_numpy(parts["torch"].copy()))
        if "torch_cuda" in parts:
            torch.cuda.set_rng_state(torch.from_numpy(parts["torch_cuda"].copy()), self.device)

    def get_optimizer_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        sd = self.optimizer.state_dict()
        arrays, scalars = {}, {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    arrays[f"{idx}/{key}"] = val.detach().cpu().numpy().copy()
                else:
                    scalars[f"{idx}/{key}"] = val
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in sd["param_groups"]]
        return arrays, {"kind": f"torch.optim.{self.cfg.optimizer}", "param_groups": groups,
                        "scalars": scalars}

    def set_optimizer_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        state: dict[int, dict[str, Any]] = {}
        for key, arr in arrays.items():
            idx, name = key.split("/", 1)
            state.setdefault(int(idx), {})[name] = torch.from_numpy(arr.copy()).to(self.device) \
                if arr.ndim else torch.tensor(arr.item())
        for key, val in meta.get("scalars", {}).items():
            idx, name = key.split("/", 1)
            state.setdefault(int(idx), {})[name] = val
        # the implementation is this run's choice, not the checkpoint's (one written before
        # fused kernels, or on another device): torch takes it from the loaded groups, and a
        # fused optimizer keeps its step count on the parameters' device
        groups = [dict(g) for g in meta["param_groups"]]
        for g, now in zip(groups, self.optimizer.param_groups):
            for key in ("fused", "foreach"):
                if key in now:
                    g[key] = now[key]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    # --- flat vectors (parameter server) ---
    def compute_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[StepResult, np.ndarray]:
        flat = self._use_flat_grads()
        flat.zero_()
        loss, metrics = self._forward_backward(x, y)
        return StepResult(loss, metrics, bool(np.isfinite(loss))), flat.cpu().numpy()

    def get_flat_params(self) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.params]).cpu().numpy()

    @torch.no_grad()
    def set_flat_params(self, flat: np.ndarray) -> None:
        src = torch.from_numpy(flat)
        for p, off in zip(self.params, self.layout.offsets):
            p.copy_(src[off:off + p.numel()].view_as(p))

    # --- what the communication mixins need (harness/backends/comm.py) ---
    def _host_tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values)

    def _has_gpu(self) -> bool:
        return torch.cuda.is_available()

    def _to_host(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    def _from_host(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def _framework_ops(self, hvd: Any) -> Any:
        from harness.backends.ops_torch import TorchOps

        return TorchOps(hvd, self.device)

    def info(self) -> BackendInfo:
        return BackendInfo("torch", self.gradient_path, {"torch": torch.__version__},
                           {"threads_per_rank": self.threads, "device": str(self.device)})


class LocalTorchBackend(LocalComm, TorchBackend):
    """One process, no gradient exchange (single-process runs and parameter-server workers)."""


class HorovodTorchBackend(HorovodComm, TorchBackend):
    """Horovod: hvd.DistributedOptimizer, broadcast_parameters + broadcast_optimizer_state."""

    hvd_module = "horovod.torch"

    def wrap_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        hvd, c = self.hvd, self.cfg
        if c.exchange == "flat":
            # One in-place allreduce of one contiguous gradient buffer per step: no fusion-buffer
            # copies, no averaging pass. The loss is scaled by 1/(size x predivide) so the sum
            # over ranks is the average (bit for bit when the world size is a power of two).
            self._use_flat_grads()
            self.grad_scale = 1.0 / (hvd.size() * c.gradient_predivide_factor)
            self._post_scale = c.gradient_predivide_factor
            return opt
        return hvd.DistributedOptimizer(
            opt, named_parameters=self.named_params,
            compression=hvd.Compression.fp16 if c.compression == "fp16" else hvd.Compression.none,
            backward_passes_per_step=c.backward_passes_per_step,
            op=hvd.Adasum if c.reduction == "adasum" else hvd.Average,
            gradient_predivide_factor=c.gradient_predivide_factor)

    def resize(self, share: float) -> None:
        self.grad_scale = share / self.cfg.gradient_predivide_factor

    def broadcast_state(self, resumed: bool = False) -> None:
        hvd = self.hvd
        # A fresh optimizer is identical on every rank by construction, so only a restored one
        # is broadcast: Horovod initialises an empty optimizer state with one zero-gradient
        # step, which would apply weight decay once and advance Adam's step counter. That step
        # can move the weights of the ranks without state, so parameters are broadcast after.
        if resumed:
            hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)
            if self.cfg.exchange == "flat":
                # that zero-gradient step gave the parameters gradients of their own: point
                # them back at the flat buffer that the exchange reduces
                self._use_flat_grads()
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)

    def zero_grad(self) -> None:
        if self.cfg.exchange == "flat":
            self._use_flat_grads().zero_()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _exchange_flat(self) -> None:
        hvd, flat = self.hvd, self._use_flat_grads()
        if hvd.size() == 1:
            # nothing to reduce (Horovod's own wrappers skip it too): an allreduce would still
            # pass the buffer through Horovod's thread, 0.7 ms a step on resnet20
            if self._post_scale != 1.0:
                flat.mul_(self._post_scale)
            return
        if self.compressor is not None:
            flat.copy_(self.compressor.exchange(flat))
        else:
            hvd.allreduce_(flat, op=hvd.Sum, name="harness.grads")
        if self._post_scale != 1.0:
            flat.mul_(self._post_scale)

    def exchange_and_step(self) -> bool:
        if self.cfg.exchange == "flat":
            with self.exchange_timer(), self.waiting():
                self._exchange_flat()
            return super().exchange_and_step()
        if self.cfg.reduction == "adasum":
            # Adasum's step applies the local update and reduces the deltas: one wait,
            # timed whole (the update is in it); it cannot synchronize apart from its step,
            # so the config refuses nan_policy = skip with it
            with self.exchange_timer(), self.waiting():
                self.optimizer.step()
            return True
        opt: Any = self.optimizer                 # hvd.DistributedOptimizer
        with self.exchange_timer(), self.waiting():
            opt.synchronize()                     # averaged gradients: the same on every rank
        if not self.grads_finite():
            return False
        with opt.skip_synchronize():
            opt.step()
        return True


class MPITorchBackend(MPIComm, TorchBackend):
    """No Horovod: one in-place mpi4py Allreduce of the flat gradient buffer per step."""

    def wrap_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # the loss scaled by 1/size, as on Horovod's flat exchange: the sum over ranks is the
        # average with no pass after it, and compression's residuals (error feedback) have
        # the same scale on both paths, so a checkpoint resumes on either
        self.grad_scale = 1.0 / self.comm.size
        return opt

    def zero_grad(self) -> None:
        self._use_flat_grads().zero_()

    def exchange_and_step(self) -> bool:
        flat = self._use_flat_grads()
        if self.comm.size > 1:
            with self.exchange_timer(), self.waiting():
                if self.compressor is not None:
                    flat.copy_(torch.from_numpy(self.compressor.exchange(flat.cpu().numpy())))
                elif self.device.type != "cpu":
                    host = flat.cpu().numpy()
                    self.comm.allreduce_flat_(host)
                    flat.copy_(torch.from_numpy(host))
                else:
                    self.comm.allreduce_flat_(flat.numpy())
        return super().exchange_and_step()

    def _broadcast_state(self, resumed: bool) -> None:
        if self.comm.size == 1:
            return
        for t in self._state.values():
            host = t.detach().cpu().numpy().copy()
            self.comm.bcast_(host)
            with torch.no_grad():
                t.copy_(torch.from_numpy(host))
        if resumed:
            self._bcast_optimizer_state()

    def _bcast_optimizer_state(self) -> None:
        """Rank 0's restored optimizer state to every rank (metadata as JSON bytes)."""
        import json

        arrays, meta = self.get_optimizer_state()
        blob = json.dumps({"meta": meta, "shapes": {k: [list(a.shape), str(a.dtype)]
                                                    for k, a in arrays.items()}}).encode()
        info = json.loads(self.comm.bcast_bytes(blob))
        arrays = {k: (arrays[k] if self.world.rank == 0 else np.empty(s, dtype=d))
                  for k, (s, d) in info["shapes"].items()}
        for key in sorted(arrays):
            self.comm.bcast_(arrays[key])
        self.set_optimizer_state(arrays, info["meta"])
