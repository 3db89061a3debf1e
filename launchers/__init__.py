"""Launchers: one run config to horovodrun, mpirun, srun and sbatch command lines.

Pure builders ``(LaunchSpec) -> argv list`` (no shell strings), a thin runner, and the
``harness launch`` command. Importing this package imports no framework.
"""

from launchers.builders import BUILDERS, build_argv
from launchers.spec import LaunchSpec

__all__ = ["BUILDERS", "LaunchSpec", "build_argv"]
