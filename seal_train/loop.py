"""The epoch loop: train(config) runs G generations, writes checkpoints and run.json, and resumes exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import KIND_ASCENT, KIND_GENERATION, KIND_LATEST, load_checkpoint, make_meta, save_checkpoint
from .config import RESUMABLE_OVERRIDES, ConfigError, TrainConfig, changed_keys, config_from_dict, coerce_value
from .data import BatchLoader, DatasetError, ImageDataset, load_dataset, stratified_split
from .distributed import (
    DeviceError,
    DistributedContext,
    all_reduce_sum,
    any_process,
    barrier,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from .epoch import EpochTotals, StepSettings, evaluate, train_epoch
from .models import build_model, check_arch_kwargs, split_parameters
from .reproducibility import capture_rng_state, deterministic_algorithms, restore_rng_state, seed_everything
from .runs import (
    CONFIG_FILE,
    LATEST_FILE,
    RUN_FILE,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    CheckpointRecord,
    EpochMetrics,
    RunFolderError,
    RunRecord,
    check_new_run_folder,
    describe_os_error,
    prepare_run_folder,
    read_saved_config,
    write_json_atomic,
)
from .strategies import (
    ASCENT_PHASE,
    GroupRule,
    Phase,
    Strategy,
    build_optimizer,
    get_strategy,
    late_modules,
    learning_rate,
    set_learning_rate,
    signed_learning_rates,
)

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C); a resumable state was saved unless stated otherwise."""

    def __init__(self, message: str, *, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoints are kept."""

    def __init__(self, message: str, *, generation: int, epoch: int) -> None:
        super().__init__(message)
        self.generation = generation
        self.epoch = epoch


@dataclass
class RunResult:
    """Outcome of train() or resume(): where the run is, its checkpoints and its metrics."""

    run_dir: Path
    strategy: str
    status: str
    checkpoints: list[CheckpointRecord]
    history: list[EpochMetrics]
    generation_val_acc: list[float]
    wall_time: float

    @property
    def final_val_acc(self) -> float | None:
        return self.generation_val_acc[-1] if self.generation_val_acc else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "run_dir": str(self.run_dir), "final_val_acc": self.final_val_acc}


@dataclass
class BatchEvent:
    """Data passed to a callback around each optimizer step: stage "before_step" (after backward) or "after_step"."""

    stage: str
    generation: int
    epoch: int
    batch: int
    phase: Phase
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stop: "StopFlag"


BatchCallback = Callable[[BatchEvent], None]


class StopFlag:
    """A request to stop after the current batch, set by Ctrl-C or by a callback."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True


@contextlib.contextmanager
def stop_on_sigint(flag: StopFlag) -> Iterator[None]:
    """Turn the first Ctrl-C into a stop request; a second Ctrl-C raises KeyboardInterrupt at once.

    Signal handlers can only be set in the main thread; elsewhere Ctrl-C keeps its default action.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        log.warning("Ctrl-C: stopping after the current batch and saving a resumable state; press Ctrl-C again to abort at once")
        flag.request()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- data and model


@dataclass
class TrainingData:
    """Training and validation sets plus their description for run records."""

    train: ImageDataset
    val: ImageDataset
    info: dict[str, Any]


def _random_subset(dataset: ImageDataset, count: int | None, *, seed: int, option: str, split: str) -> ImageDataset:
    """Draw a seeded subset of count examples; a count above the dataset's size keeps every example."""
    if count is not None and count > len(dataset):
        log.warning("%s %d is more than the %d examples of the %s set, so it is capped at %d", option, count, len(dataset), split, len(dataset))
    if count is None or count >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return dataset.subset(order[:count].sort().values)


def load_training_data(config: TrainConfig) -> TrainingData:
    """Load the training set and the validation set (held-out fraction or the test split) of a config."""
    image_size = (config.image_size, config.image_size) if config.image_size else None
    train = load_dataset(config.dataset, root=config.data_root, split="train", image_size=image_size)
    if config.val_fraction > 0:
        keep, held_out = stratified_split(train.labels, config.val_fraction, seed=config.seed)
        train, val = train.subset(keep), train.subset(held_out)
        validation = f"stratified hold-out of {config.val_fraction} of the training split"
    else:
        val = load_dataset(config.dataset, root=config.data_root, split="test", image_size=image_size)
        validation = "test split"

    train = _random_subset(train, config.train_examples, seed=config.seed, option="train_examples", split="training")
    val = _random_subset(val, config.val_examples, seed=config.seed + 1, option="val_examples", split="validation")
    if len(val) == 0:
        raise DatasetError(f"the validation set is empty; raise --val-fraction (now {config.val_fraction})")
    if val.images.shape[1:] != train.images.shape[1:]:
        raise DatasetError(
            f"validation images have shape {tuple(val.images.shape[1:])} but training images {tuple(train.images.shape[1:])}; "
            "pass --image-size to resize both"
        )

    train_fingerprint, val_fingerprint = train.fingerprint(), val.fingerprint()
    if train_fingerprint == val_fingerprint:
        raise DatasetError(
            f"dataset {config.dataset!r} at {config.data_root} has no separate test split, so validation would reuse the "
            "training images; pass --val-fraction 0.1 (or add a test/ folder)"
        )

    num_classes = config.num_classes or train.num_classes
    if num_classes != train.num_classes:
        raise ConfigError(
            f"num_classes is {config.num_classes} but dataset {config.dataset!r} has {train.num_classes} classes; "
            f"pass --num-classes {train.num_classes} or omit it"
        )
    info = {
        "name": train.name,
        "source": train.source,
        "num_classes": train.num_classes,
        "classes": list(train.classes),
        "train_examples": len(train),
        "val_examples": len(val),
        "validation": validation,
        "train_fingerprint": train_fingerprint,
        "val_fingerprint": val_fingerprint,
    }
    return TrainingData(train, val, info)


def build_run_model(config: TrainConfig, data: TrainingData) -> nn.Module:
    """Build the config's model with its initial weights drawn from config.seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config.arch, num_classes=data.info["num_classes"], in_channels=data.train.input_spec.channels, **config.arch_kwargs)


# ---------------------------------------------------------------- the run


@dataclass
class Position:
    """Position of a run: the next batch to train and whether the generation's start hook has run."""

    generation: int = 0
    epoch: int = 0
    batch: int = 0
    generation_started: bool = False


@dataclass
class Session:
    """State of one training process during a run: data, model, optimizer, loaders and records."""

    config: TrainConfig
    context: DistributedContext
    strategy: Strategy
    data: TrainingData
    model: nn.Module
    net: nn.Module
    early: list[tuple[str, nn.Parameter]]
    late: list[tuple[str, nn.Parameter]]
    train_loader: BatchLoader
    val_loader: BatchLoader
    settings: StepSettings
    record: RunRecord
    run_dir: Path
    position: Position = field(default_factory=Position)
    optimizer: torch.optim.Optimizer | None = None
    optimizer_phase: Phase | None = None
    totals: EpochTotals | None = None
    epoch_elapsed: float = 0.0


def _phase_from_dict(data: dict[str, Any]) -> Phase:
    return Phase(data["name"], GroupRule(**data["early"]), GroupRule(**data["late"]))


def _new_optimizer(session: Session, phase: Phase) -> torch.optim.Optimizer:
    config = session.config
    return build_optimizer(
        phase,
        early=[p for _, p in session.early],
        late=[p for _, p in session.late],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )


def _step_settings(config: TrainConfig, device: torch.device) -> StepSettings:
    if device.type != "cuda" and config.amp != "off":
        raise DeviceError(f"amp {config.amp!r} needs CUDA but the device is {device}; pass --amp off")
    if device.type != "cuda" and config.channels_last:
        raise DeviceError(f"channels_last is offered on CUDA only but the device is {device}; drop --channels-last")
    amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    return StepSettings(nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), device, amp_dtype, scaler, config.channels_last)


def _open_session(config: TrainConfig, context: DistributedContext) -> Session:
    """Load data, build the model, split its parameters and create the loaders of a run."""
    strategy = get_strategy(config.strategy, ascent_epochs=config.ascent_epochs, ascent_scale=config.ascent_scale)
    if config.batch_size % context.world_size:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {context.world_size} processes; pass a multiple of {context.world_size}")
    settings = _step_settings(config, context.device)
    # Checked before the data loads, which can take minutes for a large dataset.
    check_arch_kwargs(config.arch, config.arch_kwargs)

    data = load_training_data(config)
    model = build_run_model(config, data)
    early, late = split_parameters(model, config.threshold)
    model.to(context.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    spec = data.train.input_spec
    # NOTE: BatchLoader draws the crop and flip of each process's share of a batch, so a run on N
    # processes gets other augmentations than a single-process run with the same global batch
    # (the order of examples is the same). Without augmentation the two runs match.
    train_loader = BatchLoader(
        data.train,
        batch_size=config.batch_size // context.world_size,
        shuffle=True,
        augment=config.augment,
        crop_padding=config.crop_padding,
        flip=config.flip,
        seed=config.seed,
        device=context.device,
        rank=context.rank,
        world_size=context.world_size,
        spec=spec,
    )
    val_loader = BatchLoader(data.val, batch_size=config.eval_batch_size, shuffle=False, device=context.device, spec=spec)
    record = RunRecord(run_name=config.run_dir.name, strategy=config.strategy, config=config.to_dict(), dataset=data.info)
    return Session(
        config, context, strategy, data, model, model, early, late, train_loader, val_loader, settings, record, config.run_dir
    )


def _meta(session: Session, *, kind: str, generation: int, epochs_done: int) -> dict[str, Any]:
    config = session.config
    meta = make_meta(
        arch=config.arch,
        arch_kwargs=config.arch_kwargs,
        num_classes=session.data.info["num_classes"],
        input_spec=session.data.train.input_spec,
        dataset=session.data.info,
        strategy=config.strategy,
        generation=generation,
        epoch=epochs_done,
        kind=kind,
        config=config.to_dict(),
        metrics=[dataclasses.asdict(m) for m in session.record.history],
        seed=config.seed,
        threshold=config.threshold,
    )
    meta["early_parameters"] = [name for name, _ in session.early]
    meta["late_parameters"] = [name for name, _ in session.late]
    return meta


def _save_named_checkpoint(session: Session, *, kind: str, generation: int, epochs_done: int) -> None:
    """Write gen{g}.pt or gen{g}-ascent.pt and list it in run.json at once (main process only).

    Writing run.json right away keeps the file written in its list if a later write fails.
    """
    # NOTE: only the main process writes, so in a distributed run an OSError here stops rank 0
    # while the other processes wait in their next collective until its timeout.
    if not session.context.is_main:
        return
    filename = f"gen{generation}.pt" if kind == KIND_GENERATION else f"gen{generation}-ascent.pt"
    save_checkpoint(session.run_dir / filename, model=session.net, meta=_meta(session, kind=kind, generation=generation, epochs_done=epochs_done))
    session.record.add_checkpoint(CheckpointRecord(generation, kind, filename, epochs_done))
    _write_record(session, STATUS_RUNNING)
    log.info("saved %s", session.run_dir / filename)


def _save_latest(session: Session) -> None:
    """Write latest.pt: weights, optimizer, position, RNG states and metrics, enough to resume exactly."""
    if not session.context.is_main:
        return
    position = session.position
    state = {
        "position": dataclasses.asdict(position),
        "optimizer_state_dict": session.optimizer.state_dict() if session.optimizer is not None else None,
        "optimizer_phase": dataclasses.asdict(session.optimizer_phase) if session.optimizer_phase is not None else None,
        "scaler_state_dict": session.settings.scaler.state_dict() if session.settings.scaler is not None else None,
        "totals": session.totals.as_tensor().cpu() if session.totals is not None else None,
        "epoch_elapsed": session.epoch_elapsed,
        "rng": capture_rng_state(),
        "history": [dataclasses.asdict(m) for m in session.record.history],
        "checkpoints": [dataclasses.asdict(c) for c in session.record.checkpoints],
    }
    epochs_done = position.generation * session.config.epochs + position.epoch
    # Between generations the weights are those of the generation just finished.
    generation = position.generation if position.generation_started else max(epochs_done - 1, 0) // session.config.epochs
    meta = _meta(session, kind=KIND_LATEST, generation=generation, epochs_done=epochs_done)
    save_checkpoint(session.run_dir / LATEST_FILE, model=session.net, meta=meta, training_state=state)
    session.record.add_checkpoint(CheckpointRecord(generation, KIND_LATEST, LATEST_FILE, epochs_done))


def _write_record(session: Session, status: str, message: str = "") -> None:
    if not session.context.is_main:
        return
    session.record.status = status
    session.record.message = message
    write_json_atomic(session.run_dir / RUN_FILE, session.record.to_dict())


def _record_failure(session: Session, error: OSError) -> None:
    """Mark run.json as failed with the OSError that stopped the run; a second OSError is logged, not raised."""
    message = f"{describe_os_error(error)}; run.json lists the checkpoints written before it"
    try:
        _write_record(session, STATUS_FAILED, message)
    except OSError as record_error:
        log.warning("could not mark %s as failed: %s", session.run_dir / RUN_FILE, describe_os_error(record_error))


def _restore_latest(session: Session) -> None:
    """Load latest.pt into a freshly opened session."""
    # RNG states must stay on the CPU; weights and optimizer state are copied to the device on loading.
    payload = load_checkpoint(session.run_dir / LATEST_FILE, map_location="cpu")
    state = payload.get("training_state")
    if state is None:
        raise RunFolderError(f"{session.run_dir / LATEST_FILE} has no training state; it cannot be resumed")
    session.model.load_state_dict(payload["model_state_dict"])
    session.position = Position(**state["position"])
    if state["optimizer_state_dict"] is not None:
        session.optimizer_phase = _phase_from_dict(state["optimizer_phase"])
        session.optimizer = _new_optimizer(session, session.optimizer_phase)
        session.optimizer.load_state_dict(state["optimizer_state_dict"])
    if state["scaler_state_dict"] is not None and session.settings.scaler is not None:
        session.settings.scaler.load_state_dict(state["scaler_state_dict"])
    if state["totals"] is not None:
        session.totals = EpochTotals.from_tensor(state["totals"].to(session.context.device))
    session.epoch_elapsed = float(state["epoch_elapsed"])
    session.record.history = [EpochMetrics(**m) for m in state["history"]]
    session.record.checkpoints = [CheckpointRecord(**c) for c in state["checkpoints"]]
    restore_rng_state(state["rng"])


def _log_epoch(metrics: EpochMetrics, config: TrainConfig) -> None:
    log.info(
        "generation %d epoch %d/%d (%s): train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | lr early %.3g late %.3g | %.1f s",
        metrics.generation, metrics.epoch + 1, config.epochs, metrics.phase,
        metrics.train_loss, 100 * metrics.train_acc, metrics.val_loss, 100 * metrics.val_acc,
        metrics.lr_early, metrics.lr_late, metrics.wall_time,
    )


def _run_epoch(session: Session, phase: Phase, lr: float, stop: StopFlag, callback: BatchCallback | None) -> bool:
    """Train and validate one epoch from the session's position; return False when stopped mid-epoch."""
    context, position = session.context, session.position
    session.train_loader.set_epoch(position.generation * session.config.epochs + position.epoch)
    if session.totals is None:
        session.totals = EpochTotals.zeros(context.device)

    def on_batch(stage: str, batch: int) -> None:
        event = BatchEvent(stage, position.generation, position.epoch, batch, phase, session.model, session.optimizer, stop)
        callback(event)

    def should_stop() -> bool:
        return any_process(stop.requested, context)

    show = context.is_main and sys.stderr.isatty()
    started = time.perf_counter()
    with tqdm(total=len(session.train_loader), initial=position.batch, disable=not show, leave=False,
              desc=f"gen {position.generation} epoch {position.epoch + 1}/{session.config.epochs}") as progress:
        position.batch = train_epoch(
            session.net, session.train_loader, session.optimizer,
            settings=session.settings, totals=session.totals, start_batch=position.batch,
            should_stop=should_stop, on_batch=on_batch if callback else None, progress=progress,
        )
    session.epoch_elapsed += time.perf_counter() - started
    if position.batch < len(session.train_loader):
        return False

    totals = all_reduce_sum(session.totals.as_tensor(), context)
    train_loss, train_acc = float(totals[0] / totals[2]), float(totals[1] / totals[2])
    if not np.isfinite(train_loss):
        raise NonFiniteLossError(
            f"training loss is {train_loss} in generation {position.generation} epoch {position.epoch + 1}",
            generation=position.generation, epoch=position.epoch,
        )

    started = time.perf_counter()
    val_loss, val_acc = evaluate(session.net, session.val_loader, settings=session.settings)
    session.epoch_elapsed += time.perf_counter() - started
    rates = signed_learning_rates(phase, lr)
    metrics = EpochMetrics(
        generation=position.generation, epoch=position.epoch,
        global_epoch=position.generation * session.config.epochs + position.epoch,
        phase=phase.name, lr_early=rates["early"], lr_late=rates["late"],
        train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
        wall_time=session.epoch_elapsed,
    )
    session.record.history.append(metrics)
    if context.is_main:
        _log_epoch(metrics, session.config)
    return True


def _finish_epoch(session: Session, phase: Phase) -> None:
    """Write the checkpoints due after the epoch at the session's position, then advance the position."""
    config, position = session.config, session.position
    generation = position.generation
    epochs_done = generation * config.epochs + position.epoch + 1
    last_epoch = position.epoch + 1 == config.epochs

    ascent_ends = phase.name == ASCENT_PHASE and (
        last_epoch or session.strategy.phase(position.epoch + 1, generation=generation).name != ASCENT_PHASE
    )
    if ascent_ends and config.save_ascent_checkpoints:
        _save_named_checkpoint(session, kind=KIND_ASCENT, generation=generation, epochs_done=epochs_done)
    if last_epoch:
        _save_named_checkpoint(session, kind=KIND_GENERATION, generation=generation, epochs_done=epochs_done)
        session.position = Position(generation=generation + 1)
    else:
        session.position = Position(generation=generation, epoch=position.epoch + 1, generation_started=True)
    session.totals, session.epoch_elapsed = None, 0.0

    _save_latest(session)
    _write_record(session, STATUS_RUNNING)


def _start_generation(session: Session) -> None:
    """Apply the strategy's generation-start hook and drop the optimizer, so the next epoch builds a fresh one."""
    position = session.position
    names = session.strategy.on_generation_start(
        session.model,
        generation=position.generation,
        late_modules=late_modules(session.model, (name for name, _ in session.late)),
        seed=session.config.seed,
    )
    if names:
        log.info("generation %d: re-initialised %d late weight tensors", position.generation, len(names))
    position.generation_started = True
    session.optimizer, session.optimizer_phase = None, None


def _train_generations(session: Session, stop: StopFlag, callback: BatchCallback | None) -> None:
    """Run the remaining epochs from the session's position, saving checkpoints along the way."""
    config = session.config
    while session.position.generation < config.generations:
        position = session.position
        if not position.generation_started:
            _start_generation(session)

        phase = session.strategy.phase(position.epoch, generation=position.generation)
        if session.optimizer is None or phase != session.optimizer_phase:
            session.optimizer, session.optimizer_phase = _new_optimizer(session, phase), phase
        lr = learning_rate(position.epoch, base_lr=config.lr, epochs=config.epochs, warmup_epochs=config.warmup_epochs)
        set_learning_rate(session.optimizer, lr)

        if not _run_epoch(session, phase, lr, stop, callback):
            _save_latest(session)
            raise TrainingInterrupted(
                f"stopped in generation {position.generation} epoch {position.epoch + 1} after batch {position.batch}",
                run_dir=session.run_dir,
            )
        _finish_epoch(session, phase)

        if any_process(stop.requested, session.context):
            raise TrainingInterrupted(
                f"stopped after generation {position.generation} epoch {position.epoch + 1}", run_dir=session.run_dir
            )


def _result(session: Session, wall_time: float) -> RunResult:
    history = session.record.history
    per_generation = [m.val_acc for m in history if m.epoch == session.config.epochs - 1]
    return RunResult(session.run_dir, session.config.strategy, session.record.status, list(session.record.checkpoints), list(history), per_generation, wall_time)


def _execute(config: TrainConfig, *, resume: bool, overwrite: bool, callback: BatchCallback | None) -> RunResult:
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    if config.deterministic:
        # cuBLAS reproduces its results only with a fixed workspace, which must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    context = setup_distributed(config.device)
    try:
        if not resume:
            check_new_run_folder(config.run_dir, overwrite=overwrite)
        barrier(context)
        session = _open_session(config, context)
        if resume:
            _restore_latest(session)
        elif context.is_main:
            prepare_run_folder(session.run_dir, overwrite=overwrite)
            write_json_atomic(session.run_dir / CONFIG_FILE, config.to_dict())
            _write_record(session, STATUS_RUNNING)
        barrier(context)
        session.net = wrap_model(session.model, context, sync_bn=config.sync_bn)
        if not resume:
            seed_everything(config.seed)

        stop = StopFlag()
        try:
            with deterministic_algorithms(config.deterministic), stop_on_sigint(stop):
                _train_generations(session, stop, callback)
        except TrainingInterrupted as interrupted:
            _write_record(session, STATUS_INTERRUPTED, str(interrupted))
            raise
        except KeyboardInterrupt as error:
            message = "aborted by a second Ctrl-C; the run resumes from the last completed epoch"
            _write_record(session, STATUS_INTERRUPTED, message)
            raise TrainingInterrupted(message, run_dir=session.run_dir) from error
        except NonFiniteLossError as error:
            _write_record(session, STATUS_FAILED, f"{error}; the checkpoints written before it are kept")
            raise
        except OSError as error:
            _record_failure(session, error)
            raise
        try:
            _write_record(session, STATUS_FINISHED)
        except OSError as error:
            _record_failure(session, error)
            raise
        return _result(session, time.perf_counter() - started)
    finally:
        teardown_distributed(context)
        torch.set_num_threads(previous_threads)


def train(config: TrainConfig, *, overwrite: bool = False, callback: BatchCallback | None = None) -> RunResult:
    """Train a new run in config.run_dir and return its result.

    Seeds the global torch, numpy and Python RNGs from config.seed, and restores torch's
    deterministic-algorithm setting and thread count when it returns.

    Raises RunFolderError if the folder already contains a run (unless overwrite), TrainingInterrupted
    after Ctrl-C (a resumable latest.pt is saved) and NonFiniteLossError when the loss becomes NaN.
    An OSError during the epochs (a full disk) propagates after run.json is marked failed.
    callback, if given, is called before and after every optimizer step with a BatchEvent.
    """
    return _execute(config, resume=False, overwrite=overwrite, callback=callback)


def resume(run_dir: str | Path, *, overrides: dict[str, Any] | None = None, callback: BatchCallback | None = None) -> RunResult:
    """Continue the run in run_dir from its latest.pt with the config saved there.

    overrides may change only the keys in RESUMABLE_OVERRIDES (device, eval batch size, CPU
    threads), and may repeat any other key with its saved value. On the CPU with the same thread
    count and deterministic=True, the final weights are bit-identical to those of an uninterrupted
    run, also after a stop in the middle of an epoch or of an ascent phase.
    """
    # NOTE: in a multi-node run every node reads latest.pt and config.json from run_dir, so the run
    # folder must be on a file system that all nodes share.
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunFolderError(f"run folder {run_dir} not found; check the path")
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a run folder; check the path")
    if not (run_dir / LATEST_FILE).is_file():
        raise RunFolderError(f"{run_dir} has no {LATEST_FILE} to resume from; start it again with --overwrite")
    saved = config_from_dict(read_saved_config(run_dir))

    overrides = dict(overrides or {})
    folder_keys = ("out_dir", "run_name")
    changed = [key for key in changed_keys(saved, overrides) if key not in RESUMABLE_OVERRIDES + folder_keys]
    if changed:
        details = ", ".join(f"{key}={overrides[key]!r} (saved: {getattr(saved, key)!r})" for key in changed)
        raise ConfigError(f"cannot change {details} when resuming; drop these options or start a new run")
    allowed = {key: coerce_value(key, value) for key, value in overrides.items() if key in RESUMABLE_OVERRIDES}
    config = dataclasses.replace(saved, **allowed, out_dir=str(run_dir.parent), run_name=run_dir.name)
    return _execute(config, resume=True, overwrite=False, callback=callback)
