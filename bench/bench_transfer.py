"""Benchmark run_transfer: linear-probe fitting time (C grid search + refit) against feature-extraction time.

Setup: the narrow demo ResNet with random weights (seed 0, in_channels=1), its penultimate
layer (128 features), and one target: the embedded Fashion-MNIST subset (10,000 train and
2,000 test images at 28x28, no conversion) by default, or scikit-learn's digits resized to
28x28. Both timings come from one run_transfer call, so they share the machine's state.
Run from the repository root:

    python bench/bench_transfer.py --out /tmp/bench_transfer.json
    python bench/bench_transfer.py --threads 1 --out /tmp/bench_transfer_1thread.json

--threads sets torch's intra-op threads and the BLAS threads of numpy and scikit-learn.
Without it, each library keeps its own thread count, and the output records the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
from pathlib import Path

import torch
from threadpoolctl import threadpool_info, threadpool_limits

from seal_probe.transfer import DEFAULT_C_GRID, FewShotSettings, run_transfer
from seal_train.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, InputSpec
from seal_train.models import build_model

SPEC = InputSpec(1, 28, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["fashion-mnist-subset", "digits"], default="fashion-mnist-subset", help="target dataset")
    parser.add_argument("--threads", type=int, default=None, help="torch and BLAS threads (default: each library's own count)")
    parser.add_argument("--episodes", type=int, default=600, help="5-way 5-shot episodes to time as well (0 skips few-shot)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split and the episodes")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the measurements")
    return parser.parse_args()


def thread_counts() -> dict:
    return {
        "torch_threads": torch.get_num_threads(),
        "blas": [{"library": info["internal_api"], "threads": info["num_threads"]} for info in threadpool_info()],
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limits = threadpool_limits(limits=args.threads, user_api="blas") if args.threads is not None else contextlib.nullcontext()

    torch.manual_seed(0)
    model = build_model("resnet-narrow", num_classes=10, in_channels=1)
    few_shot = FewShotSettings(episodes=args.episodes) if args.episodes > 0 else None

    with limits:
        threads = thread_counts()
        result = run_transfer(
            model, args.target, spec=SPEC, resize=args.target == "digits",
            seed=args.seed, few_shot=few_shot, batch_size=args.batch_size, device="cpu",
        )

    probe = result.linear_probe
    report = {
        "target": result.target["name"],
        "train_size": result.target["train_size"],
        "test_size": result.target["test_size"],
        "feature_dim": result.feature_dim,
        "grid_size": len(DEFAULT_C_GRID),
        "extraction_seconds": result.extraction_seconds,
        "fit_seconds": result.fit_seconds,
        "fit_to_extraction_ratio": result.fit_seconds / result.extraction_seconds,
        "few_shot_seconds": result.few_shot_seconds,
        "few_shot_episodes": args.episodes,
        "chosen_c": probe.chosen_c,
        "test_accuracy": probe.test_accuracy,
        "refit_iterations": probe.iterations,
        "val_iterations": probe.val_iterations,
        "converged": probe.converged,
        "few_shot_mean": result.few_shot.mean if result.few_shot else None,
        "few_shot_ci95": result.few_shot.ci95 if result.few_shot else None,
        **threads,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "versions": result.versions,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
