"""mpi4py helpers: the world communicator and buffer-based (never pickled) reductions."""

from __future__ import annotations

import sys

import numpy as np

from harness.errors import ConfigError


def as_bytes(a: np.ndarray) -> np.ndarray:
    """A contiguous array's memory as uint8, a view: a collective that writes it writes ``a``
    (mpi4py maps no MPI datatype to float16 and bfloat16, and a copy needs none)."""
    if not a.flags.c_contiguous:
        raise ValueError("a collective needs a contiguous array (a copy would not be written)")
    return a.reshape(-1).view(np.uint8)


#: set when Horovod, having started MPI in this process, shut it down: MPI cannot start twice
#: in one process, so a later run here (Horovod, mpi4py, the parameter server, auto's agreement)
#: would abort inside MPI
MPI_ENDED = False


def mpi_running() -> bool:
    """MPI was started in this process before Horovod (by mpi4py): Horovod leaves it running."""
    m = sys.modules.get("mpi4py.MPI")
    return bool(m is not None and m.Is_initialized() and not m.Is_finalized())


def check_mpi_can_start(what: str = "this run") -> None:
    """One line instead of MPI's abort for a second run in one process (``harness.run`` twice)
    after a Horovod run ended MPI."""
    if MPI_ENDED:
        raise ConfigError(f"{what} needs MPI, which an earlier Horovod run in this process has "
                          "shut down, and MPI cannot start twice in one process: start each "
                          "run in a process of its own (`harness train`, or a subprocess "
                          "that calls harness.run)")


def mpi():
    """The mpi4py MPI module, initialised with MPI_THREAD_MULTIPLE (Horovod needs it too)."""
    check_mpi_can_start()
    import mpi4py

    mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI

    return MPI


class HostReducer:
    """Small float64 reductions over a private duplicate of COMM_WORLD."""

    def __init__(self, comm=None) -> None:
        MPI = mpi()
        self.MPI = MPI
        self.comm = (comm or MPI.COMM_WORLD).Dup()
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        send = np.ascontiguousarray(values, dtype=np.float64)
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=self._ops[op])
        return recv

    def allreduce_flat_(self, flat: np.ndarray) -> None:
        """In-place sum of a contiguous float32 vector (the flat gradient)."""
        self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)

    def bcast_(self, a: np.ndarray, root: int = 0) -> None:
        """In place, any dtype (as bytes: mpi4py maps no MPI datatype to float16)."""
        self.comm.Bcast(as_bytes(a), root=root)

    def allgather_(self, a: np.ndarray, out: np.ndarray) -> None:
        """Every rank's ``a`` into ``out`` (shape (size, *a.shape)), any dtype."""
        self.comm.Allgather(as_bytes(a), as_bytes(out))

    def bcast_bytes(self, blob: bytes, root: int = 0) -> bytes:
        """Broadcast a byte string through the buffer API (length first; nothing pickled)."""
        n = np.array([len(blob)], np.int64)
        self.comm.Bcast(n, root=root)
        buf = np.frombuffer(blob, np.uint8).copy() if self.rank == root else \
            np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=root)
        return buf.tobytes()

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def library_version(self) -> str:
        return self.MPI.Get_library_version().strip().splitlines()[0]
