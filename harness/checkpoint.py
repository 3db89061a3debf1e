"""Atomic, pickle-free checkpoints.

A checkpoint is one ``.npz`` file (numeric arrays only, read with ``allow_pickle=False``, so
loading one never executes code) holding the weights in the canonical layout, the optimizer
state, and a JSON header with the position in training and the config. Files are named by
step and written to a temporary file, fsynced, then ``os.replace``d into place: an interrupted
write leaves at most a stray temporary file, never a broken checkpoint under a real name.
The newest checkpoint that loads wins; a corrupt newest one falls back to the previous one,
which is never overwritten. ``keep`` newest files are retained.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import CheckpointError, StorageError, TrainingAborted
from harness.files import atomic_write

FORMAT_VERSION = 1
_NAME = re.compile(r"^(?P<prefix>[a-z0-9_-]+)-(?P<step>\d{9})\.npz$")


@dataclass
class Checkpoint:
    meta: dict[str, Any]
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None
    #: run bookkeeping that must survive a resume (e.g. the step times behind the summary)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    #: every rank's gradient-compression state (error-feedback residuals), stacked by rank
    exchange: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta["position"]["step"])


def check_writable(directory: Path) -> None:
    """Fail before training starts if checkpoints could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True):
            pass
    except OSError as e:
        raise CheckpointError(f"checkpoint folder {str(directory)!r} is not writable "
                              f"({e.strerror}): choose another out_dir or fix its "
                              "permissions") from None


def save(directory: Path, ckpt: Checkpoint, prefix: str = "ckpt", keep: int = 2) -> Path:
    """Write atomically as ``<prefix>-<step>.npz``; keep the ``keep`` newest. Returns the path."""
    for name, arr in ckpt.weights.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            prev = latest_paths(directory, prefix)
            kept = f"the previous checkpoint, {prev[0].name}, is kept" if prev else \
                "no checkpoint was written before it"
            raise TrainingAborted(f"refusing to checkpoint step {ckpt.step}: parameter "
                                  f"{name!r} holds NaN/Inf values ({kept})")
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(ckpt.meta, format_version=FORMAT_VERSION, saved_at=time.time())
    arrays: dict[str, np.ndarray] = {
        "meta.json": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    arrays.update({f"w/{k}": v for k, v in ckpt.weights.items()})
    arrays.update({f"o/{k}": v for k, v in ckpt.optimizer.items()})
    arrays.update({f"x/{k}": v for k, v in ckpt.extra.items()})
    arrays.update({f"e/{k}": v for k, v in ckpt.exchange.items()})
    final = directory / f"{prefix}-{ckpt.step:09d}.npz"
    try:
        atomic_write(final, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    except StorageError as e:
        prev = latest_paths(directory, prefix)
        kept = f" The previous checkpoint {prev[0].name} is intact." if prev else ""
        raise CheckpointError(f"{e}{kept} Resume from it once there is room.") from None
    for old in latest_paths(directory, prefix)[keep:]:
        try:
            old.unlink()
        except OSError:
            pass
    return final


def latest_paths(directory: Path, prefix: str = "ckpt") -> list[Path]:
    """Checkpoint files of ``prefix`` in ``directory``, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and m["prefix"] == prefix:
            found.append((int(m["step"]), p))
    return [p for _, p in sorted(found, reverse=True)]


def load(path: Path) -> Checkpoint:
    """Read one checkpoint file; CheckpointError if it is not a complete harness checkpoint."""
    if path.is_dir():
        inside = sorted((int(m["step"]), p) for d in (path, path / "checkpoints") if d.is_dir()
                        for p in d.iterdir() if (m := _NAME.match(p.name)))
        example = str(inside[-1][1]) if inside else f"{path}/checkpoints/ckpt-000000100.npz"
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder: give one checkpoint file, "
                              f"e.g. {example} (resume = 'auto' continues the run folder's own)")
    if path.is_file() and path.suffix != ".npz" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{str(path)!r} is not a checkpoint: give a checkpoint file the "
                              "harness wrote (<run>/checkpoints/ckpt-<step>.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta.json" not in z.files:
                raise CheckpointError(f"{path} is not a harness checkpoint (no meta.json)")
            meta = json.loads(bytes(z["meta.json"]).decode())
            weights = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
            optimizer = {k[2:]: z[k] for k in z.files if k.startswith("o/")}
            extra = {k[2:]: z[k] for k in z.files if k.startswith("x/")}
            exchange = {k[2:]: z[k] for k in z.files if k.startswith("e/")}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error,
            json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format_version')!r}; "
                              f"this harness reads format {FORMAT_VERSION}")
    return Checkpoint(meta, weights, optimizer, path, extra, exchange)


def load_latest(directory: Path, prefix: str = "ckpt",
                warn=None) -> Checkpoint | None:
    """The newest checkpoint that loads, skipping (and reporting) corrupt newer ones."""
    errors = []
    for p in latest_paths(directory, prefix):
        try:
            ckpt = load(p)
        except CheckpointError as e:
            errors.append(str(e))
            if warn:
                warn(f"skipping unreadable checkpoint: {e}")
            continue
        return ckpt
    if errors:
        raise CheckpointError("no readable checkpoint in " f"{directory}: " + "; ".join(errors))
    return None


def check_compatible(ckpt: Checkpoint, expected: dict[str, Any]) -> None:
    """The checkpoint must come from the same framework, model and parameter-server layout."""
    for key, want in expected.items():
        got = ckpt.meta.get(key)
        if got != want:
            raise CheckpointError(f"checkpoint {ckpt.path} was written with {key} = {got!r}, but "
                                  f"this run has {key} = {want!r}: resume with the same {key}, "
                                  "or start in a fresh out_dir/run_name")
