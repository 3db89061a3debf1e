"""Error types the CLI turns into one clear message and a non-zero exit (no traceback)."""


class HarnessError(Exception):
    """A problem the user can fix; the message names the bad value and the fix. ``quiet``:
    every rank meets the same error at the same point, and this one leaves saying it to
    rank 0."""

    exit_code = 2
    quiet = False       # (a subclass's own __init__ need not pass it)

    def __init__(self, *args: object, quiet: bool = False) -> None:
        super().__init__(*args)
        self.quiet = quiet


class ConfigError(HarnessError):
    """Invalid run configuration (TOML, CLI flags or a combination of them)."""


class DataError(HarnessError):
    """Missing or malformed dataset files."""


class CheckpointError(HarnessError):
    """A checkpoint that cannot be read, or that belongs to another run."""


class StorageError(HarnessError):
    """Results or checkpoints cannot be written (permissions, full disk)."""


class LaunchError(HarnessError):
    """A launcher that cannot be started (not installed, not on PATH)."""


class EnvironmentMismatch(HarnessError):
    """Launcher, MPI and scheduler disagree about the world (rank, size)."""


class TrainingAborted(HarnessError):
    """Training stopped on purpose: non-finite values, a stalled or failed rank."""

    exit_code = 3


