"""Benchmark the Hessian engine on a ResNet18: product cost, time to the top eigenvalue, products for the top 10.

Compares one Hessian-vector product with one gradient, Lanczos with PyHessian 0.1's
`hessian.eigenvalues()` for the top eigenvalue, and Lanczos with deflated power iteration for the
top 10, all on the same model and batch. Prints a Markdown table.

    python bench/bench_hessian.py --batch-size 32 --threads 1 --json /tmp/hessian.json
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

import seal_train
from seal_probe.hessian import EigenResult, HessianOperator, gradient_start, lanczos, power_iteration

logger = logging.getLogger("bench_hessian")
TOLERANCE = 1e-3


def load_batch(batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Take a random batch of the shipped Fashion-MNIST subset, padded to 32x32 and repeated to 3 channels."""
    archive = np.load(Path(seal_train.__file__).parent / "assets" / "fashion_mnist_subset.npz")
    generator = np.random.default_rng(seed)
    index = generator.choice(len(archive["train_labels"]), size=batch_size, replace=False)
    images = torch.from_numpy(archive["train_images"][index]).float() / 255.0
    images = (images - 0.286) / 0.353
    images = nn.functional.pad(images, (2, 2, 2, 2)).unsqueeze(1).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(archive["train_labels"][index].astype(np.int64))
    return images, labels


class Stopwatch:
    """Wall-clock and process CPU seconds since construction.

    On a shared machine wall-clock time varies with other tenants' load, while the CPU time of a
    single-threaded process measures the work itself, so the ratios in the table use CPU time.
    """

    def __init__(self) -> None:
        self.wall_begin = time.perf_counter()
        self.cpu_begin = time.process_time()

    def read(self) -> dict[str, float]:
        return {"wall": time.perf_counter() - self.wall_begin, "cpu": time.process_time() - self.cpu_begin}


def seconds(function) -> float:
    """Return the CPU seconds one call takes."""
    watch = Stopwatch()
    function()
    return watch.read()["cpu"]


def measure_product_costs(model: nn.Module, batch, repeats: int) -> dict[str, dict[str, float]]:
    """Return median CPU seconds per gradient and per product, and each product's ratio to a gradient.

    Each mode is timed over consecutive calls after one warm-up call, as an algorithm issues them.
    CPU time of a single-threaded process does not depend on other tenants' load, so no
    interleaving is needed.
    """
    inputs, targets = batch
    parameters = list(model.parameters())

    def gradient():
        loss = nn.functional.cross_entropy(model(inputs), targets)
        return torch.autograd.grad(loss, parameters)

    settings = {
        "forward_over_reverse": {"hvp_mode": "forward_over_reverse"},
        "double_backward": {"hvp_mode": "double_backward", "cache_graph": False},
        "double_backward_cached": {"hvp_mode": "double_backward", "cache_graph": True},
    }
    medians = {"gradient": statistics.median(consecutive_seconds(gradient, repeats))}
    for label, options in settings.items():
        operator = HessianOperator(model, [batch], **options)
        vector = torch.randn(operator.size, generator=torch.Generator().manual_seed(0))
        medians[label] = statistics.median(consecutive_seconds(lambda: operator.matvec(vector), repeats))
        del operator
    return {
        "seconds": medians,
        "ratio_to_gradient": {label: medians[label] / medians["gradient"] for label in settings},
    }


def consecutive_seconds(function, repeats: int) -> list[float]:
    function()
    return [seconds(function) for _ in range(repeats)]


def run_lanczos_top(model: nn.Module, batch, *, seed: int, criterion: str, start: str, **options) -> dict:
    """Time operator setup plus Lanczos for the top eigenvalue at tol 1e-3, recording the top Ritz value per step.

    start="gradient" starts from gradient_start (as analyze_hessian does by default), "random" from a
    Gaussian vector. No explicit residual product is made: the value is what the benchmark times.
    """
    trajectory: list[float] = []
    watch = Stopwatch()
    operator = HessianOperator(model, [batch], seed=seed, **options)
    vector = gradient_start(operator, operator.data_gradient, seed=seed) if start == "gradient" else None
    result = lanczos(
        operator,
        k=1,
        tol=TOLERANCE,
        seed=seed,
        criterion=criterion,
        start=vector,
        explicit_residuals=False,
        callback=lambda step, values: trajectory.append(float(values[-1])),
    )
    return {
        **watch.read(),
        "value": result.values[0],
        "products": operator.num_matvecs,
        "trajectory": trajectory,
        "hvp_mode": operator.hvp_mode,
    }


def run_pyhessian_top(model: nn.Module, batch, *, seed: int, tol: float = 1e-3) -> dict:
    """Time PyHessian 0.1's hessian(...).eigenvalues(maxIter=100, tol), recording each product's Rayleigh quotient."""
    pyhessian = importlib.import_module("pyhessian.hessian")
    private = copy.deepcopy(model).eval()
    trajectory: list[float] = []
    original_product = pyhessian.hessian_vector_product

    def recording_product(gradients, params, vector):
        product = original_product(gradients, params, vector)
        trajectory.append(float(sum((hv * v).sum() for hv, v in zip(product, vector))))
        return product

    pyhessian.hessian_vector_product = recording_product
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            watch = Stopwatch()
            computer = pyhessian.hessian(private, nn.functional.cross_entropy, data=batch, cuda=False)
            values, _ = computer.eigenvalues(maxIter=100, tol=tol)
            elapsed = watch.read()
    finally:
        pyhessian.hessian_vector_product = original_product
    return {**elapsed, "value": float(values[0]), "products": len(trajectory), "trajectory": trajectory}


def products_to_accuracy(trajectory: list[float], reference: float) -> int | None:
    """Return the number of products after which the estimate first lies within TOLERANCE of reference, relative."""
    for count, value in enumerate(trajectory, start=1):
        if abs(value - reference) <= TOLERANCE * abs(reference):
            return count
    return None


def max_relative_residual(result: EigenResult) -> float:
    """Return max_i ||H v_i - lambda_i v_i|| / |lambda_i|, which bounds each value's relative distance to an eigenvalue."""
    return max(residual / abs(value) for value, residual in zip(result.values, result.residuals))


def max_relative_difference(values, reference) -> float:
    return max(abs(value - exact) / abs(exact) for value, exact in zip(values, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="examples in the one batch the Hessian is taken over")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; CPU-time ratios are only meaningful with 1"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed consecutive calls per product mode and for the gradient")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of every top-eigenvalue method (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data and start vectors")
    parser.add_argument("--reference-steps", type=int, default=40, help="max Lanczos steps for the reference top eigenvalue")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers to this JSON file")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(arguments.threads)

    torch.manual_seed(arguments.seed)
    model = torchvision.models.resnet18(num_classes=10).eval()
    batch = load_batch(arguments.batch_size, arguments.seed)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info("ResNet18: %d parameters, batch of %d 3x32x32 images", num_parameters, arguments.batch_size)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    # 1. Cost of one product relative to one gradient.
    costs = measure_product_costs(model, batch, arguments.repeats)
    ratios = costs["ratio_to_gradient"]
    logger.info("Product costs: %s", costs)

    # 2. A tight reference for the top eigenvalue.
    cached = HessianOperator(model, [batch], cache_graph=True)
    reference = lanczos(cached, k=1, tol=1e-7, max_iter=arguments.reference_steps, seed=arguments.seed + 100)
    top = reference.values[0]
    logger.info("Reference top eigenvalue %.6g, residual %.2g", top, reference.residuals[0])

    # 3. Top eigenvalue: each method in every round, in the same order, with medians over rounds.
    # With one batch the operator keeps the gradient graph by default, as PyHessian's data= mode does.
    methods = {}
    for start in ("gradient", "random"):
        for criterion in ("gap", "residual"):
            methods[f"Lanczos, {start} start, {criterion} criterion"] = (
                lambda start=start, criterion=criterion: run_lanczos_top(
                    model, batch, seed=arguments.seed, criterion=criterion, start=start
                )
            )
    for tol in (1e-3, 1e-4):
        methods[f"PyHessian eigenvalues(), tol {tol:g}"] = lambda tol=tol: run_pyhessian_top(
            model, batch, seed=arguments.seed, tol=tol
        )
    runs: dict[str, list[dict]] = {label: [] for label in methods}
    for round_index in range(arguments.rounds):
        for label, method in methods.items():
            runs[label].append(method())
        logger.info("Top eigenvalue round %d CPU seconds: %s", round_index, {label: round(r[-1]["cpu"], 2) for label, r in runs.items()})
    pyhessian_tight = run_pyhessian_top(model, batch, seed=arguments.seed, tol=1e-6)
    median_cpu = {label: statistics.median(run["cpu"] for run in results) for label, results in runs.items()}
    median_wall = {label: statistics.median(run["wall"] for run in results) for label, results in runs.items()}

    # 4. Top 10: both solvers use cached-graph products, which cost the same, so only the counts matter.
    top10_operator = HessianOperator(model, [batch], cache_graph=True)
    top10_start = gradient_start(top10_operator, top10_operator.data_gradient, seed=arguments.seed)
    top10 = {}
    for start in ("gradient", "random"):
        for criterion in ("residual", "gap"):
            top10[(start, criterion)] = lanczos(
                top10_operator,
                k=10,
                tol=TOLERANCE,
                seed=arguments.seed,
                criterion=criterion,
                start=top10_start if start == "gradient" else None,
            )
    logger.info("Lanczos top 10 products: %s", {key: result.num_matvecs for key, result in top10.items()})
    top10_power = power_iteration(top10_operator, k=10, which="magnitude", max_iter=100, tol=TOLERANCE, seed=arguments.seed)
    logger.info("Power iteration top 10: %d products", top10_power.num_matvecs)
    total_seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    rows = [
        ("HVP / gradient, forward-over-reverse", f"{ratios['forward_over_reverse']:.2f}x", "<= 3x"),
        ("HVP / gradient, double backward", f"{ratios['double_backward']:.2f}x", "<= 3x"),
        ("HVP / gradient, double backward with cached graph", f"{ratios['double_backward_cached']:.2f}x", "<= 3x"),
    ]
    for pyhessian_label in [label for label in methods if label.startswith("PyHessian")]:
        for label in [label for label in methods if label.startswith("Lanczos")]:
            rows.append(
                (
                    f"top eigenvalue, median CPU time: {pyhessian_label} / {label}",
                    f"{median_cpu[pyhessian_label] / median_cpu[label]:.2f}x "
                    f"({median_cpu[pyhessian_label]:.2f} s / {median_cpu[label]:.2f} s; "
                    f"wall {median_wall[pyhessian_label]:.2f} s / {median_wall[label]:.2f} s)",
                    ">= 3x",
                )
            )
    for label, results in runs.items():
        run = results[0]
        rows.append(
            (
                f"top eigenvalue, {label}: products at stop / relative error at stop",
                f"{run['products']} / {abs(run['value'] - top) / abs(top):.1e}",
                "error <= 1e-3",
            )
        )
    power_reached = products_to_accuracy(pyhessian_tight["trajectory"], top)
    for start in ("gradient", "random"):
        reached = products_to_accuracy(runs[f"Lanczos, {start} start, residual criterion"][0]["trajectory"], top)
        rows.append(
            (
                f"top eigenvalue, products until within 1e-3 of the reference: PyHessian power iteration / Lanczos, {start} start",
                f"{power_reached} / {reached}",
                "",
            )
        )
    for (start, criterion), result in top10.items():
        rows.append(
            (
                f"top-10 products: deflated power / Lanczos, {start} start, {criterion} criterion (with the 10 explicit residual products)",
                f"{top10_power.num_matvecs / result.num_matvecs:.2f}x ({top10_power.num_matvecs} / {result.num_matvecs})",
                ">= 5x",
            )
        )
    reference10 = top10[("random", "residual")]
    rows += [
        (
            "top-10 max relative residual: deflated power / Lanczos (gradient residual, gradient gap, random residual, random gap)",
            f"{max_relative_residual(top10_power):.1e} / "
            + ", ".join(f"{max_relative_residual(result):.1e}" for result in top10.values()),
            "",
        ),
        (
            "top-10 max relative difference from the random-start residual-criterion Lanczos values: power / Lanczos gradient residual / gradient gap",
            f"{max_relative_difference(top10_power.values, reference10.values):.1e} / "
            f"{max_relative_difference(top10[('gradient', 'residual')].values, reference10.values):.1e} / "
            f"{max_relative_difference(top10[('gradient', 'gap')].values, reference10.values):.1e}",
            "",
        ),
    ]

    print(
        f"ResNet18 (torchvision, 10 classes, {num_parameters} parameters), one batch of {arguments.batch_size} "
        f"3x32x32 Fashion-MNIST images, eval mode, float32, {arguments.threads} CPU threads, "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs visible"
    )
    print(
        f"Reference top eigenvalue {top:.6g} (Lanczos, tol 1e-7, residual {reference.residuals[0]:.1e}); "
        f"gradient {costs['seconds']['gradient'] * 1e3:.0f} ms CPU (median); whole run {total_seconds:.0f} s wall; "
        f"1-minute load average {load_before:.1f} at the start and {load_after:.1f} at the end"
    )
    print()
    print("| measure | result | target |")
    print("| --- | --- | --- |")
    for measure, result, target in rows:
        print(f"| {measure} | {result} | {target} |")

    if arguments.json is not None:
        raw = {
            "costs": costs,
            "load_average": [load_before, load_after],
            "reference_top": top,
            "reference_residual": reference.residuals[0],
            "top1_runs": runs,
            "pyhessian_tol_1e-6": pyhessian_tight,
            "top10": {
                name: {
                    "values": list(result.values),
                    "residuals": list(result.residuals),
                    "products": result.num_matvecs,
                    "iterations": result.num_iterations,
                    "converged": result.converged,
                }
                for name, result in [("power", top10_power)]
                + [(f"lanczos_{start}_{criterion}", result) for (start, criterion), result in top10.items()]
            },
        }
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
