"""Benchmark run_prediction_depth: time against its parts and against scikit-learn, and peak memory by layer count.

Setup: full Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist), the first
--support training images as the support set, the first --queries test images as queries, and
a network with random weights (seed 0): the narrow demo ResNet by default, or --arch
cifar-resnet18 (ResNet18 with a 3x3 stem, the widths of the paper's networks). Run from the
repository root:

    python bench/bench_depth.py --out /tmp/bench_depth.json
    python bench/bench_depth.py --arch cifar-resnet18 --repeats 1 --skip-memory --out /tmp/bench_depth_resnet18.json

Three measurements, each timed as wall-clock and as process CPU time (all threads).
1. time: run_prediction_depth end to end and, right before it in the same process, its
   reference cost: one plain forward pass over support and queries plus one IndexFlatL2 add +
   search per layer on embeddings already in memory. The pair runs --repeats times, and each
   repeat gives a ratio, because the load from other jobs on a shared machine drifts.
2. sklearn: KNeighborsClassifier(algorithm="brute") fit + predict per layer on flattened
   embeddings, the approach of public prediction-depth code. It runs on --sklearn-queries
   queries and is scaled linearly to all queries, because brute-force search cost is linear in
   the number of queries. The flattened embeddings come from one streamed pass to disk and are
   loaded one layer at a time. Two totals are reported. With one forward pass, the approach
   must hold every flattened layer in memory (the size is reported). With one forward pass per
   layer after the input, it keeps one layer at a time in memory, as public code that extracts
   one layer per pass does. The measured plain forward pass is added once or once per layer.
3. memory: peak RSS of run_prediction_depth with all 8 default probe layers and with every
   other one of them (4), each in a fresh subprocess. The peak is VmHWM from /proc/self/status,
   reset after loading. ru_maxrss is not used because a child inherits its parent's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from seal_probe.depth import run_prediction_depth
from seal_probe.layers import extract_embeddings, resolve_probe_layers
from seal_train.data import load_dataset, to_float
from seal_train.models import build_model

K = 30
BATCH_SIZE = 256


@dataclass
class Elapsed:
    """Wall-clock and process CPU seconds of one measured step."""

    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: "Elapsed") -> "Elapsed":
        return Elapsed(self.wall + other.wall, self.cpu + other.cpu)

    def __mul__(self, factor: float) -> "Elapsed":
        return Elapsed(self.wall * factor, self.cpu * factor)


class Stopwatch:
    """Context manager that stores the wall-clock and CPU seconds of its body in .elapsed."""

    def __enter__(self) -> "Stopwatch":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info) -> None:
        self.elapsed = Elapsed(time.perf_counter() - self._wall, time.process_time() - self._cpu)


def load_inputs(root: str, support: int, queries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train = load_dataset("fashion-mnist", root=root, split="train")
    test = load_dataset("fashion-mnist", root=root, split="test")
    support_images = to_float(train.images[:support], train.mean, train.std)
    query_images = to_float(test.images[:queries], test.mean, test.std)
    return support_images, train.labels[:support], query_images, test.labels[:queries]


def random_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, num_classes=10, in_channels=1)


def plain_forward(model: torch.nn.Module, *tensors: torch.Tensor) -> None:
    with torch.inference_mode():
        model.eval()
        for images in tensors:
            for start in range(0, len(images), BATCH_SIZE):
                model(images[start : start + BATCH_SIZE])


def faiss_search(support: np.ndarray, queries: np.ndarray) -> None:
    index = faiss.IndexFlatL2(support.shape[1])
    index.add(np.ascontiguousarray(support, dtype=np.float32))
    index.search(np.ascontiguousarray(queries, dtype=np.float32), K)


def ratio(numerator: Elapsed, denominator: Elapsed) -> dict[str, float]:
    return {"wall": numerator.wall / denominator.wall, "cpu": numerator.cpu / denominator.cpu}


def total(parts: dict[str, Elapsed]) -> Elapsed:
    summed = Elapsed()
    for elapsed in parts.values():
        summed = summed + elapsed
    return summed


def embed_in_memory(model: torch.nn.Module, images: torch.Tensor, layers: list[str], *, reduce: str) -> dict[str, np.ndarray]:
    with extract_embeddings(model, images, layers, reduce=reduce) as store:
        return {layer: store.embeddings(layer, mmap=False) for layer in layers}


def time_repeat(model, support, support_labels, queries, query_labels, support_vectors, query_vectors) -> dict:
    """Time the reference (plain forward + FAISS search per layer) and run_prediction_depth back to back.

    Pairing them in time keeps their ratio meaningful while the load from other jobs drifts.
    """
    with Stopwatch() as forward:
        plain_forward(model, support, queries)
    search = {}
    for layer in support_vectors:
        with Stopwatch() as watch:
            faiss_search(support_vectors[layer], query_vectors[layer])
        search[layer] = watch.elapsed
    reference = forward.elapsed + total(search)

    with Stopwatch() as run:
        result = run_prediction_depth(model, support, support_labels, queries, query_labels, k=K, batch_size=BATCH_SIZE)
    logging.info("run_prediction_depth %.1f s, reference %.1f s (wall)", run.elapsed.wall, reference.wall)
    return {
        "result": result,
        "run": run.elapsed,
        "forward": forward.elapsed,
        "search": search,
        "reference": reference,
    }


def measure_time(args: argparse.Namespace) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    support, support_labels, queries, query_labels = load_inputs(args.data_root, args.support, args.queries)
    model = random_model(args.arch)
    plain_forward(model, support[:512])  # warm-up: thread pools and convolution kernels
    layers = resolve_probe_layers(model, input_shape=tuple(support.shape[1:]))
    support_vectors = embed_in_memory(model, support, layers, reduce="pool")
    query_vectors = embed_in_memory(model, queries, layers, reduce="pool")

    repeats = [
        time_repeat(model, support, support_labels, queries, query_labels, support_vectors, query_vectors)
        for _ in range(args.repeats)
    ]
    del support_vectors, query_vectors
    result = repeats[-1]["result"]
    fastest = min(repeats, key=lambda repeat: repeat["run"].wall)

    sklearn: dict[str, Elapsed] = {}
    subset = queries[: args.sklearn_queries]
    flat_dims: dict[str, int] = {}
    with extract_embeddings(model, support, layers, reduce="flatten") as flat_support, extract_embeddings(
        model, subset, layers, reduce="flatten"
    ) as flat_queries:
        for layer in layers:
            support_layer = flat_support.embeddings(layer, mmap=False)
            query_layer = flat_queries.embeddings(layer, mmap=False)
            flat_dims[layer] = support_layer.shape[1]
            with Stopwatch() as watch:
                probe = KNeighborsClassifier(n_neighbors=K, algorithm="brute").fit(support_layer, support_labels.numpy())
                probe.predict(query_layer)
            sklearn[layer] = watch.elapsed
            logging.info("sklearn %s (%d dims, %d queries): %.1f s", layer, flat_dims[layer], len(subset), watch.elapsed.wall)
            del support_layer, query_layer
    sklearn_search = total(sklearn) * (args.queries / len(subset))
    fastest_forward = min((repeat["forward"] for repeat in repeats), key=lambda elapsed: elapsed.wall)
    fastest_search = min((total(repeat["search"]) for repeat in repeats), key=lambda elapsed: elapsed.wall)
    sklearn_total = fastest_forward + sklearn_search
    forwards_per_layer = len(layers) - 1
    sklearn_total_per_layer = fastest_forward * forwards_per_layer + sklearn_search
    flat_gib = sum(flat_dims.values()) * (args.support + args.queries) * 4 / 2**30

    return {
        "layers": result.settings.layers,
        "repeats": [
            {
                "run_prediction_depth": vars(repeat["run"]),
                "run_internal_timing": vars(repeat["result"].timing),
                "reference_forward": vars(repeat["forward"]),
                "reference_faiss_search": {layer: vars(elapsed) for layer, elapsed in repeat["search"].items()},
                "reference_total": vars(repeat["reference"]),
                "ratio_to_reference": ratio(repeat["run"], repeat["reference"]),
            }
            for repeat in repeats
        ],
        "fastest_repeat_ratio_to_reference": ratio(fastest["run"], fastest["reference"]),
        "sklearn_flat_dims": flat_dims,
        "sklearn_queries_timed": len(subset),
        "sklearn_timed": {layer: vars(elapsed) for layer, elapsed in sklearn.items()},
        "sklearn_search_scaled": vars(sklearn_search),
        "sklearn_total_estimate": vars(sklearn_total),
        "speedup_over_sklearn": ratio(sklearn_total, fastest["run"]),
        "sklearn_all_flat_layers_gib": flat_gib,
        "sklearn_forward_passes_per_layer": forwards_per_layer,
        "sklearn_total_estimate_forward_per_layer": vars(sklearn_total_per_layer),
        "speedup_over_sklearn_forward_per_layer": ratio(sklearn_total_per_layer, fastest["run"]),
        "search_speedup_over_sklearn": ratio(sklearn_search, fastest_search),
        "mean_depth": result.mean_depth,
        "fraction_never_consistent": result.fraction_never_consistent,
    }


def memory_status_mib(field: str) -> float:
    """Return a memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status; this measurement needs Linux")


def measure_memory(args: argparse.Namespace) -> dict:
    """Run run_prediction_depth once in this process and return its peak RSS.

    The high-water mark is reset after the data and model are loaded (writing 5 to
    /proc/self/clear_refs, Linux 4.0 or later), so the peak belongs to run_prediction_depth.
    """
    support, support_labels, queries, query_labels = load_inputs(args.data_root, args.support, args.queries)
    model = random_model(args.arch)
    layers = resolve_probe_layers(model, input_shape=tuple(support.shape[1:]))
    if args.num_layers == 4:
        layers = layers[::2]

    peak_while_loading = memory_status_mib("VmHWM")
    baseline = memory_status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = run_prediction_depth(model, support, support_labels, queries, query_labels, layers=layers, k=K, batch_size=BATCH_SIZE)
    peak = memory_status_mib("VmHWM")
    return {
        "layers": result.layer_names,
        "peak_rss_while_loading_mib": peak_while_loading,
        "rss_before_run_mib": baseline,
        "peak_rss_during_run_mib": peak,
        "peak_increase_mib": peak - baseline,
        "seconds": result.timing.total_seconds,
    }


def memory_in_subprocess(args: argparse.Namespace, num_layers: int) -> dict:
    command = [
        sys.executable, __file__, "--measure", "memory", "--num-layers", str(num_layers),
        "--data-root", args.data_root, "--support", str(args.support), "--queries", str(args.queries), "--arch", args.arch,
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist", help="folder with the Fashion-MNIST idx files")
    parser.add_argument("--arch", default="resnet-narrow", choices=["resnet-narrow", "cifar-resnet18"], help="architecture with random weights")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory runs of 8 and 4 probe layers")
    parser.add_argument("--support", type=int, default=20_000, help="support-set size (training images)")
    parser.add_argument("--queries", type=int, default=5_000, help="number of query images (test split)")
    parser.add_argument("--sklearn-queries", type=int, default=500, help="queries timed for the scikit-learn baseline")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the paired reference and run_prediction_depth timings")
    parser.add_argument("--measure", choices=["all", "memory"], default="all", help="all: every measurement; memory: one peak-memory run (used by the subprocesses)")
    parser.add_argument("--num-layers", type=int, choices=[4, 8], default=8, help="number of probe layers in a memory run")
    parser.add_argument("--out", type=Path, help="write the measurements to this JSON file")
    args = parser.parse_args()

    if args.measure == "memory":
        print(json.dumps(measure_memory(args)))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = {
        "command": " ".join(sys.argv),
        "arch": args.arch,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, faiss threads {faiss.omp_get_max_threads()}",
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__},
        "support": args.support,
        "queries": args.queries,
        "k": K,
    }
    report["time"] = measure_time(args)
    if not args.skip_memory:
        report["memory_8_layers"] = memory_in_subprocess(args, 8)
        report["memory_4_layers"] = memory_in_subprocess(args, 4)
        eight, four = report["memory_8_layers"], report["memory_4_layers"]
        report["memory_ratio_8_to_4"] = eight["peak_rss_during_run_mib"] / four["peak_rss_during_run_mib"]
        report["memory_increase_ratio_8_to_4"] = eight["peak_increase_mib"] / four["peak_increase_mib"]

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
