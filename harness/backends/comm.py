"""How a backend talks to the other ranks, written once for both frameworks.

Each mixin supplies ``init_distributed``, ``allreduce_host``, ``shutdown`` and its part of
``info`` on top of a framework backend (TorchBackend, TFBackend), which supplies what differs:
``hvd_module`` (horovod.torch or horovod.tensorflow), ``_host_tensor`` and ``_has_gpu``.
Nothing here imports a framework at import time.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from harness.backends import mpi_comm
from harness.backends.base import Backend, BackendInfo
from harness.backends.common import (apply_horovod_environment, check_horovod_combination,
                                     check_no_horovod_features, horovod_settings_in)
from harness.compress import dense_sent_bytes
from harness.env import World, loopback_slot
from harness.errors import ConfigError


class LocalComm(Backend):
    """One process, no gradient exchange (single-process runs and parameter-server workers)."""

    gradient_path = "local"

    def init_distributed(self) -> World:
        if self.cfg.mode == "sync":
            if self.world.size > 1:
                raise ConfigError(f"allreduce = 'local' trains one process, but the launcher "
                                  f"started {self.world.size}: use allreduce = 'horovod' or "
                                  "'mpi'")
            check_no_horovod_features(self.cfg, "local")
        return self.world

    def broadcast_state(self, resumed: bool = False) -> None:
        pass

    def allreduce_host(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def sent_bytes(self) -> int | None:
        return 0

    def _sum_params(self, flat):
        return flat


class HorovodComm(Backend):
    """Horovod: init with the harness's Horovod settings; small reductions through hvd."""

    gradient_path = "horovod"
    hvd_module = ""
    _mpi_was_running = False

    def init_distributed(self) -> World:
        mpi_comm.check_mpi_can_start("allreduce = 'horovod'")
        self.hvd_env = apply_horovod_environment(self.cfg, self.world.rank)
        hvd = importlib.import_module(self.hvd_module)
        self.hvd = hvd
        self._mpi_was_running = mpi_comm.mpi_running()
        hvd.init()
        check_horovod_combination(self.cfg, hvd.size(), gloo=hvd.gloo_enabled(),
                                  gpu=self._has_gpu())
        return self.refresh_world()

    # every collective counts as a wait (Backend.waiting), as on the mpi4py path
    def allreduce_host(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        hvd = self.hvd
        t = self._host_tensor(np.asarray(values, dtype=np.float64).copy())
        with self.waiting():
            out = hvd.allreduce(t, op=hvd.Sum if op == "sum" else hvd.Max,
                                name=f"harness.host.{op}")
            return out.numpy()

    def shutdown(self) -> None:
        try:
            ends_mpi = self.hvd.mpi_enabled() and not self._mpi_was_running
        except ValueError:      # Horovod is not running: its shutdown ends nothing
            ends_mpi = False
        self.hvd.shutdown()
        if ends_mpi:     # Horovod started MPI, so its shutdown finalized it
            mpi_comm.MPI_ENDED = True

    def _sum_params(self, flat):
        with self.waiting():
            return self.hvd.allreduce(flat, op=self.hvd.Sum, name="harness.params")

    def _allgather_host(self, a: np.ndarray) -> np.ndarray:
        t = self._host_tensor(np.ascontiguousarray(a[None]))
        with self.waiting():
            return np.array(self.hvd.allgather(t, name="harness.host.allgather").numpy())

    def _broadcast_host(self, a: np.ndarray) -> np.ndarray:
        t = self._host_tensor(np.ascontiguousarray(a))
        with self.waiting():
            return np.array(self.hvd.broadcast(t, root_rank=0,
                                               name="harness.host.broadcast").numpy())

    def exchange_state(self) -> dict[str, np.ndarray]:
        with self.waiting():            # the compressor's gathers
            return super().exchange_state()

    def restore_exchange(self) -> list[str]:
        with self.waiting():
            return super().restore_exchange()

    def elastic_run(self, func):
        return importlib.import_module(self.hvd_module + ".elastic").run(func)

    def bcast_object(self, obj):
        return self.hvd.broadcast_object(obj, root_rank=0, name="harness.elastic.state")

    def refresh_world(self) -> World:
        hvd = self.hvd
        local_rank, local_size = loopback_slot(os.environ) or (hvd.local_rank(),
                                                               hvd.local_size())
        self.world = World(hvd.rank(), hvd.size(), local_rank, local_size, self.world.source)
        return self.world

    def _make_compressor(self) -> None:
        from harness.compress import for_run

        if self.cfg.exchange == "flat":     # the optimizer paths use Horovod's own fp16
            self.compressor = for_run(self.cfg, self._framework_ops(self.hvd), self.layout.shapes,
                                      channels_last=self.framework == "tensorflow")

    def sent_bytes(self) -> int | None:
        if self.compressor is not None:
            return self.compressor.sent_bytes
        n = self.layout.total
        if self.cfg.compression == "fp16":       # Horovod's fp16 on the optimizer's tensors
            return dense_sent_bytes(n, self.world.size, itemsize=2)
        return dense_sent_bytes(n, self.world.size)

    def info(self) -> BackendInfo:
        import horovod

        info = super().info()
        info.versions["horovod"] = horovod.__version__
        info.settings.update(self.hvd_env)
        # the effective value, also when the launch environment set it rather than the harness
        info.settings["HOROVOD_WAKE_ON_ENQUEUE"] = os.environ.get("HOROVOD_WAKE_ON_ENQUEUE", "0")
        # what Horovod fuses with: the set value, else autotuned or Horovod 0.28.1's 128 MiB
        info.settings["HOROVOD_FUSION_THRESHOLD"] = os.environ.get(
            "HOROVOD_FUSION_THRESHOLD",
            "autotuned" if "HOROVOD_AUTOTUNE" in horovod_settings_in(os.environ)
            else str(128 << 20))
        info.settings["controller"] = "gloo" if self.hvd.gloo_enabled() else "mpi"
        info.settings.update(compression=self.cfg.compression, reduction=self.cfg.reduction,
                             backward_passes_per_step=self.cfg.backward_passes_per_step,
                             grad_exchange=self.cfg.exchange,
                             gradient_predivide_factor=self.cfg.gradient_predivide_factor)
        return info


class MPIComm(Backend):
    """No Horovod: mpi4py on a duplicate of COMM_WORLD (buffers, never pickles)."""

    gradient_path = "mpi"

    def init_distributed(self) -> World:
        check_no_horovod_features(self.cfg, "mpi")
        from harness.backends.mpi_comm import HostReducer

        self.comm = HostReducer()
        local = self.comm.comm.Split_type(self.comm.MPI.COMM_TYPE_SHARED)
        self.world = World(self.comm.rank, self.comm.size, local.Get_rank(), local.Get_size(),
                           self.world.source)
        return self.world

    def allreduce_host(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        with self.waiting():
            return self.comm.allreduce(values, op)

    def broadcast_state(self, resumed: bool = False) -> None:
        with self.waiting():
            self._broadcast_state(resumed)

    def _broadcast_state(self, resumed: bool) -> None:
        """Rank 0's weights (and a restored optimizer state) to every rank, over mpi4py."""
        raise NotImplementedError

    def exchange_state(self) -> dict[str, np.ndarray]:
        with self.waiting():            # the compressor's gathers, on its own communicator
            return super().exchange_state()

    def restore_exchange(self) -> list[str]:
        with self.waiting():
            return super().restore_exchange()

    def sent_bytes(self) -> int | None:
        if self.compressor is not None:
            return self.compressor.sent_bytes
        return dense_sent_bytes(self.layout.total, self.world.size)

    def _sum_params(self, flat):
        host = np.array(self._to_host(flat), np.float32)
        if self.comm.size > 1:
            with self.waiting():
                self.comm.allreduce_flat_(host)
        return self._from_host(host)

    def _allgather_host(self, a: np.ndarray) -> np.ndarray:
        out = np.empty((self.comm.size, *a.shape), a.dtype)
        with self.waiting():
            self.comm.allgather_(np.ascontiguousarray(a), out)
        return out

    def _broadcast_host(self, a: np.ndarray) -> np.ndarray:
        a = np.array(a)
        with self.waiting():
            self.comm.bcast_(a)
        return a

    def _make_compressor(self) -> None:
        """The run's compressor over mpi4py (NumPy arithmetic on host buffers)."""
        from harness.compress import NumpyOps, for_run

        self.compressor = for_run(self.cfg, NumpyOps(self.comm.comm), self.layout.shapes,
                                  channels_last=self.framework == "tensorflow")

    def info(self) -> BackendInfo:
        import mpi4py

        info = super().info()
        info.versions["mpi4py"] = mpi4py.__version__
        info.settings["mpi"] = self.comm.library_version()
        return info
