"""Horovod/MPI allreduce training harness.

The core is framework-free: importing ``harness`` loads neither torch, tensorflow, horovod nor
mpi4py. Only the backend chosen at run time imports its framework.
"""

__version__ = "0.1.0"
