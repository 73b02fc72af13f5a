"""Time seal-train's training epoch against a minimal hand-written PyTorch loop on the same model, data and optimizer.

Both loops train resnet-narrow on the first --examples images of the embedded Fashion-MNIST
subset with SGD (momentum 0.9, weight decay 5e-4), label smoothing 0.1, batch --batch-size and
no augmentation. Repetitions alternate between the two loops so that load changes on a shared
machine hit both alike. The report gives medians of wall time and of process CPU time, which
is steadier on a busy machine when torch runs one thread. A second measurement times whole
epochs of train() (validation, latest.pt and run.json included) against the hand-written
epoch plus a hand-written validation pass.

    python bench/bench_train.py --examples 1280 --repeats 15 --threads 1 --out /tmp/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from seal_train.config import resolve_config
from seal_train.data import BatchLoader, load_dataset, to_float
from seal_train.epoch import EpochTotals, StepSettings, train_epoch
from seal_train.loop import BatchEvent, train
from seal_train.models import build_model, split_parameters
from seal_train.strategies import build_optimizer, get_strategy, set_learning_rate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2560, help="training images per epoch")
    parser.add_argument("--val-examples", type=int, default=1000, help="validation images for the whole-epoch comparison")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="epochs timed per loop")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def fresh_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet-narrow", num_classes=10, in_channels=1)


def hand_written_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, epoch: int) -> None:
    """Train one epoch the way a plain PyTorch loop does: shuffle, forward, loss, backward, step."""
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
    for start in range(0, len(labels), batch_size):
        index = order[start : start + batch_size]
        loss = criterion(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def hand_written_validation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), 512):
        correct += int((model(images[start : start + 512]).argmax(1) == labels[start : start + 512]).sum())
    return correct / len(labels)


class Clock:
    """Wall time and process CPU time since creation."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def summarise(suite: list[tuple[float, float]], hand: list[tuple[float, float]]) -> dict:
    """Return per-repetition times and medians of (wall, CPU) pairs for both loops."""
    summary = {}
    for index, clock in enumerate(("wall", "cpu")):
        suite_times = [pair[index] for pair in suite]
        hand_times = [pair[index] for pair in hand]
        summary[clock] = {
            "seal_train_s": suite_times,
            "hand_written_s": hand_times,
            "median_seal_train_s": statistics.median(suite_times),
            "median_hand_written_s": statistics.median(hand_times),
            "ratio_of_medians": statistics.median(suite_times) / statistics.median(hand_times),
        }
    return summary


def time_train_epochs(args: argparse.Namespace) -> dict:
    """Alternate one seal-train epoch (train_epoch) and one hand-written epoch, args.repeats times each."""
    dataset = load_dataset("fashion-mnist-subset").subset(range(args.examples))
    loader = BatchLoader(dataset, batch_size=args.batch_size, shuffle=True, augment=False, seed=0)
    images = to_float(dataset.images, dataset.mean, dataset.std)

    suite_model, hand_model = fresh_model(), fresh_model()
    early, late = split_parameters(suite_model, "layer3")
    phase = get_strategy("seal", ascent_epochs=1, ascent_scale=-0.01).phase(0, generation=0)
    suite_optimizer = build_optimizer(phase, early=[p for _, p in early], late=[p for _, p in late], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    set_learning_rate(suite_optimizer, 0.1)
    hand_optimizer = torch.optim.SGD(hand_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    settings = StepSettings(nn.CrossEntropyLoss(label_smoothing=0.1), torch.device("cpu"))

    suite_times, hand_times = [], []
    for repeat in range(args.repeats + 1):
        loader.set_epoch(repeat)
        clock = Clock()
        train_epoch(suite_model, loader, suite_optimizer, settings=settings, totals=EpochTotals.zeros(torch.device("cpu")))
        suite_time = clock.elapsed()

        clock = Clock()
        hand_written_epoch(hand_model, hand_optimizer, images, dataset.labels, batch_size=args.batch_size, epoch=repeat)
        hand_time = clock.elapsed()

        # The first repetition warms up allocator and caches and is not counted.
        if repeat > 0:
            suite_times.append(suite_time)
            hand_times.append(hand_time)

    return summarise(suite_times, hand_times)


def time_whole_epochs(args: argparse.Namespace) -> dict:
    """Time the epochs of a full train() run against hand-written training plus validation epochs.

    The run has repeats + 2 epochs, so that repeats whole epochs lie between its first steps.
    """
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        config = resolve_config(overrides={
            "train_examples": args.examples, "val_examples": args.val_examples, "batch_size": args.batch_size,
            "augment": False, "generations": 1, "epochs": args.repeats + 2, "warmup_epochs": 1,
            "strategy": "normal", "out_dir": folder, "num_threads": args.threads,
        })
        epoch_starts: list[tuple[float, float]] = []

        def mark_epoch_start(event: BatchEvent) -> None:
            if event.stage == "before_step" and event.batch == 0:
                epoch_starts.append((time.perf_counter(), time.process_time()))

        # The time from one epoch's first step to the next epoch's first step covers training,
        # validation, latest.pt and run.json. The first epoch is warm-up and not counted.
        train(config, callback=mark_epoch_start)
        suite_times = [(later[0] - earlier[0], later[1] - earlier[1]) for earlier, later in zip(epoch_starts[1:], epoch_starts[2:])]

    train_set = load_dataset("fashion-mnist-subset")
    train_set = train_set.subset(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[: args.examples].sort().values)
    val_set = load_dataset("fashion-mnist-subset", split="test")
    val_set = val_set.subset(torch.randperm(len(val_set), generator=torch.Generator().manual_seed(1))[: args.val_examples].sort().values)
    images = to_float(train_set.images, train_set.mean, train_set.std)
    val_images = to_float(val_set.images, val_set.mean, val_set.std)
    model = fresh_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    hand_times = []
    for repeat in range(args.repeats + 1):
        clock = Clock()
        hand_written_epoch(model, optimizer, images, train_set.labels, batch_size=args.batch_size, epoch=repeat)
        hand_written_validation(model, val_images, val_set.labels)
        if repeat > 0:
            hand_times.append(clock.elapsed())

    return summarise(suite_times, hand_times)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    results = {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads()},
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "train_epoch": time_train_epochs(args),
        "whole_epoch": time_whole_epochs(args),
    }
    for name in ("train_epoch", "whole_epoch"):
        for clock in ("wall", "cpu"):
            entry = results[name][clock]
            logging.getLogger("bench").warning(
                "%s (%s time): seal-train %.3f s, hand-written %.3f s, ratio %.3f",
                name, clock, entry["median_seal_train_s"], entry["median_hand_written_s"], entry["ratio_of_medians"],
            )
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
