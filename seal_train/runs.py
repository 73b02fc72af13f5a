"""Run folders: config.json, run.json (checkpoint list and per-epoch metrics), written atomically."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest.pt"
RUN_FORMAT = "seal-suite-run"

STATUS_RUNNING = "running"
STATUS_FINISHED = "finished"
STATUS_INTERRUPTED = "interrupted"
STATUS_FAILED = "failed"


class RunFolderError(ValueError):
    """A run folder that already contains a run, cannot be written, or cannot be resumed."""


@dataclass
class EpochMetrics:
    """Metrics of one epoch; epoch counts from 0 within the generation, global_epoch across the run.

    train_loss is the training objective (label-smoothed cross-entropy) averaged over the epoch's
    augmented batches in train mode. val_loss is plain cross-entropy in eval mode. Accuracies are
    fractions in [0, 1]. lr_early and lr_late are the signed learning rates (negative: ascent).
    wall_time is the seconds spent training and validating in that epoch, checkpoint writes excluded.
    """

    generation: int
    epoch: int
    global_epoch: int
    phase: str
    lr_early: float
    lr_late: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    wall_time: float


@dataclass
class CheckpointRecord:
    """One checkpoint file of a run; epoch counts the epochs completed in the run when it was written."""

    generation: int
    kind: str
    path: str
    epoch: int


@dataclass
class RunRecord:
    """Contents of run.json."""

    run_name: str
    strategy: str
    status: str = STATUS_RUNNING
    config: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    history: list[EpochMetrics] = field(default_factory=list)
    message: str = ""
    format: str = RUN_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        return cls(
            run_name=data["run_name"],
            strategy=data["strategy"],
            status=data.get("status", STATUS_RUNNING),
            config=dict(data.get("config", {})),
            dataset=dict(data.get("dataset", {})),
            checkpoints=[CheckpointRecord(**entry) for entry in data.get("checkpoints", [])],
            history=[EpochMetrics(**entry) for entry in data.get("history", [])],
            message=data.get("message", ""),
        )

    def add_checkpoint(self, record: CheckpointRecord) -> None:
        """Add a checkpoint, replacing an earlier entry for the same file."""
        self.checkpoints = [entry for entry in self.checkpoints if entry.path != record.path]
        self.checkpoints.append(record)


def describe_os_error(error: OSError) -> str:
    """Format an OSError as one line: the file it names (if any) and the operating system's reason."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno is not None and error.strerror:
        reason = f"{reason} (errno {error.errno})"
    return f"cannot write or read {error.filename}: {reason}" if error.filename else reason


def name_target_file(error: OSError, path: Path, temporary: str) -> None:
    """Make an OSError raised while writing the temporary file of an atomic write name path instead.

    The temporary file is deleted after the failure, so a message naming it would point nowhere.
    """
    if error.filename is None or str(error.filename) == str(temporary):
        error.filename = str(path)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call write on a temporary file in the same folder, fsync it, then rename it over path.

    A process killed at any moment leaves either the old file or the new one, never a
    truncated file. An OSError (full disk, missing permission) propagates with filename set to path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            name_target_file(error, path, temporary)
        raise
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    """Write data as indented JSON to path atomically (see write_atomic)."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))


def read_run(run_dir: Path) -> RunRecord:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir} has no {RUN_FILE}, so it is not a seal-train run folder; check the path")
    try:
        return RunRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise RunFolderError(f"{path} is not a valid run record: {error}") from error


def read_saved_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir} has no {CONFIG_FILE}; it cannot be resumed")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path} is not valid JSON: {error}") from error


def holds_run(run_dir: Path) -> bool:
    """Return whether run_dir contains a run's files (run.json, latest.pt or gen*.pt)."""
    run_dir = Path(run_dir)
    return (run_dir / RUN_FILE).exists() or (run_dir / LATEST_FILE).exists() or any(run_dir.glob("gen*.pt"))


def check_new_run_folder(run_dir: Path, *, overwrite: bool) -> None:
    """Raise RunFolderError unless a new run may be written to run_dir (read-only check)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output path {run_dir} exists and is not a folder; choose another --out-dir or --run-name")
    if holds_run(run_dir) and not overwrite:
        raise RunFolderError(f"{run_dir} already contains a run; pass --resume to continue it or --overwrite to replace it")
    for parent in (run_dir, *run_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"cannot create run folder {run_dir}: {parent} is a file; choose another --out-dir")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise RunFolderError(f"cannot write to {parent}; choose a writable --out-dir")
            break


def prepare_run_folder(run_dir: Path, *, overwrite: bool) -> None:
    """Create run_dir and make sure files can be written there; with overwrite, delete the old run's files.

    Only files a run writes (run.json, config.json, *.pt) are deleted, never anything else in the folder.
    """
    run_dir = Path(run_dir)
    check_new_run_folder(run_dir, overwrite=overwrite)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as error:
        raise RunFolderError(f"cannot write to run folder {run_dir}: {error.strerror or error}; choose a writable --out-dir") from error

    if overwrite and holds_run(run_dir):
        log.info("overwriting the run in %s", run_dir)
        for path in [run_dir / RUN_FILE, run_dir / CONFIG_FILE, *run_dir.glob("*.pt")]:
            path.unlink(missing_ok=True)
