"""The `seal-probe` command line: depth, hessian, transfer, layers, report and study."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from seal_train.runs import write_json_atomic

from .analyses import DataOptions, DepthOptions, HessianOptions, TransferOptions, measure_depth, measure_hessian, measure_transfer, require_eager_module
from .integrity import ModelChangedError
from .loading import LoadedModel, load_model

log = logging.getLogger("seal_probe")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Audit image-classifier checkpoints: prediction depth, Hessian spectrum, transfer; compare runs.",
)

# ---------------------------------------------------------------- shared options

Checkpoints = Annotated[list[Path], typer.Argument(help="Checkpoint files (.pt, .pth, .safetensors, TorchScript).", show_default=False)]
Arch = Annotated[Optional[str], typer.Option(help="Architecture of a raw state dict: a seal-train name, torchvision:<name> or timm:<name>.")]
ModelDef = Annotated[Optional[str], typer.Option("--model-def", help="Your own model class as path/to/file.py:ClassName (imports that file).")]
NumClasses = Annotated[Optional[int], typer.Option(help="Class count, where the file does not say.")]
InChannels = Annotated[Optional[int], typer.Option(help="Input channel count, where the file does not say.")]
InputSize = Annotated[Optional[str], typer.Option(help="Input size as H or HxW pixels, where the file does not say.")]
Mean = Annotated[Optional[str], typer.Option(help="Per-channel normalisation mean, comma-separated, where the file does not say.")]
Std = Annotated[Optional[str], typer.Option(help="Per-channel normalisation std, comma-separated, where the file does not say.")]
Trust = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow full unpickling of a whole pickled module. This runs code from the file.")]
Partial = Annotated[bool, typer.Option("--allow-partial", help="Load a checkpoint whose keys do not all match the architecture.")]
Ema = Annotated[str, typer.Option(help="Weights to take when a file has EMA and plain weights: auto (EMA), use, ignore.")]
Dataset = Annotated[Optional[str], typer.Option(help="Probe dataset name; default: the dataset a suite checkpoint was trained on.")]
DataRoot = Annotated[Optional[str], typer.Option(help="Folder with the dataset's files.")]
ConvertChannels = Annotated[bool, typer.Option("--convert-channels", help="Convert grayscale to RGB (or back) when the data and the model differ.")]
Resize = Annotated[bool, typer.Option("--resize", help="Resize images bilinearly to the model's input size.")]
Device = Annotated[Optional[str], typer.Option(help="Device for forward passes: cpu, cuda, cuda:1; default: CUDA when available.")]
Out = Annotated[Optional[Path], typer.Option(help="Output folder for CSV, JSON and PNG files.")]
JsonFile = Annotated[Optional[Path], typer.Option("--json", help="Also write the JSON summary with every setting to this file.")]
Seed = Annotated[int, typer.Option(help="Seed of every random choice (subsets, probe vectors, episodes).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")]


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers such as 0.485,0.456,0.406, got {text!r}") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match:
        raise typer.BadParameter(f"--input-size must be H or HxW in pixels such as 64 or 64x64, got {text!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _resolve_device(device: str | None) -> str:
    import torch

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_all(paths: list[Path], load_options: dict[str, Any]) -> list[LoadedModel]:
    return [load_model(path, **load_options) for path in paths]


def checkpoint_label(loaded: LoadedModel) -> str:
    """Name a checkpoint for tables and legends: strategy and generation for suite checkpoints, else the file stem."""
    meta = loaded.meta or {}
    if meta.get("strategy") is not None and meta.get("generation") is not None:
        suffix = "-ascent" if meta.get("kind") == "ascent" else ""
        return f"{meta['strategy']}-gen{meta['generation']}{suffix}"
    return Path(loaded.path).stem


def unique_labels(models: list[LoadedModel]) -> list[str]:
    """Return one label per checkpoint, adding the parent folder name where labels collide."""
    labels = [checkpoint_label(model) for model in models]
    counts = Counter(labels)
    labels = [f"{Path(model.path).parent.name}/{label}" if counts[label] > 1 else label for model, label in zip(models, labels)]
    counts = Counter(labels)
    return [f"{label}#{i}" if counts[label] > 1 else label for i, label in enumerate(labels)]


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def run_command(body: Callable[[], int | None]) -> None:
    """Run a command body, turning the suite's input errors into one line on stderr and exit code 2."""
    try:
        code = body()
    except ModelChangedError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(3) from None
    except (ValueError, EOFError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None
    except OSError as error:
        # An output path that is a file, a full disk, a folder without write permission.
        where = f" {error.filename}" if error.filename else ""
        typer.echo(f"error: cannot write or read{where}: {error.strerror or error}; check --out and the disk", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; no output was written for the checkpoint in progress", err=True)
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def _write_summary(out: Path, name: str, payload: dict[str, Any], json_file: Path | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    write_json_atomic(path, payload)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_file, payload)
    return path


def _load_options(arch, model_def, num_classes, in_channels, input_size, mean, std, trust, partial, ema, device) -> dict[str, Any]:
    return dict(
        arch=arch, model_def=model_def, num_classes=num_classes, in_channels=in_channels,
        input_size=_size(input_size), mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
        trust_checkpoint=trust, allow_partial=partial, ema=ema, map_location=device,
    )


# ---------------------------------------------------------------- depth


@app.command()
def depth(
    checkpoints: Checkpoints,
    k: Annotated[int, typer.Option(help="Neighbours per k-NN probe.")] = 30,
    support_size: Annotated[int, typer.Option(help="Support examples (class-balanced subset of --support-split).")] = 2000,
    query_size: Annotated[int, typer.Option(help="Query examples (class-balanced subset of --query-split).")] = 1000,
    support_split: Annotated[str, typer.Option(help="Split the support set comes from: train or test.")] = "train",
    query_split: Annotated[str, typer.Option(help="Split the queries come from: train (depth of training examples) or test.")] = "test",
    distance: Annotated[str, typer.Option(help="k-NN distance: euclidean or cosine.")] = "euclidean",
    layers: Annotated[Optional[list[str]], typer.Option("--layers", help="Probe layers: module-name patterns (fnmatch), 'input', 'output'; repeat the option.")] = None,
    reduce: Annotated[str, typer.Option(help="Feature-map reduction: pool (adaptive average pooling to --max-dim) or flatten.")] = "pool",
    max_dim: Annotated[int, typer.Option(help="Largest embedding size per layer after pooling.")] = 4096,
    include_self: Annotated[bool, typer.Option("--include-self", help="Let a query that is in the support set be its own neighbour.")] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 256,
    dataset: Dataset = None, data_root: DataRoot = None, convert_channels: ConvertChannels = False, resize: Resize = False,
    arch: Arch = None, model_def: ModelDef = None, num_classes: NumClasses = None, in_channels: InChannels = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, trust_checkpoint: Trust = False,
    allow_partial: Partial = False, ema: Ema = "auto", device: Device = None,
    out: Out = None, json_file: JsonFile = None, seed: Seed = 0, verbose: Verbose = False,
) -> None:
    """Measure prediction depth with k-NN probes on every layer's embeddings (FAISS, exact search)."""
    _setup_logging(verbose)

    def body() -> None:
        from .depth import plot_depth, write_examples_csv, write_layers_csv

        target = _resolve_device(device)
        models = _load_all(checkpoints, _load_options(arch, model_def, num_classes, in_channels, input_size, mean, std, trust_checkpoint, allow_partial, ema, target))
        data = DataOptions(dataset=dataset, root=data_root, convert_channels=convert_channels, resize=resize)
        options = DepthOptions(
            support_split=support_split, support_size=support_size, query_split=query_split, query_size=query_size,
            k=k, distance=distance, layers=tuple(layers) if layers else None, reduce=reduce, max_dim=max_dim,
            exclude_self=not include_self, batch_size=batch_size, seed=seed,
        )
        folder = out or Path("results") / "depth"

        results, records = {}, []
        for label, loaded in zip(unique_labels(models), models):
            result, record = measure_depth(loaded, data, options, device=target)
            results[label] = result
            records.append({"label": label, **record.to_dict()})
            folder.mkdir(parents=True, exist_ok=True)
            write_examples_csv(result, folder / f"{_file_label(label)}.examples.csv")
            write_layers_csv(result, folder / f"{_file_label(label)}.layers.csv")

        summary = _write_summary(folder, "depth.json", {"command": "depth", "checkpoints": records}, json_file)
        plot = plot_depth(results, folder / "depth.png")
        typer.echo(f"{'checkpoint':<28} {'mean depth':>10} {'95% CI':>17} {'never consistent':>17}")
        for label, result in results.items():
            ci = result.mean_depth_ci95
            ci_text = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "n/a"
            mean_text = f"{result.mean_depth:.3f}" if result.mean_depth is not None else "n/a"
            typer.echo(f"{label:<28} {mean_text:>10} {ci_text:>17} {result.num_never_consistent:>8} of {len(result.predictions)}")
        typer.echo(f"wrote {summary}, {plot} and per-example CSV files in {folder}")

    run_command(body)


# ---------------------------------------------------------------- hessian


@app.command()
def hessian(
    checkpoints: Checkpoints,
    top_k: Annotated[int, typer.Option(help="Number of top eigenvalues.")] = 5,
    smallest: Annotated[bool, typer.Option("--smallest", help="Also compute the most negative eigenvalues (as many as --top-k).")] = False,
    method: Annotated[Optional[str], typer.Option(help="Eigenvalue method: lanczos (default engine) or power (PyHessian's).")] = None,
    tol: Annotated[float, typer.Option(help="Relative tolerance of the eigenvalue estimates.")] = 1e-3,
    lanczos_start: Annotated[str, typer.Option(help="Lanczos start vector: gradient (the loss gradient plus a Gaussian vector, which needs fewer products) or random.")] = "gradient",
    examples: Annotated[int, typer.Option(help="Examples in the fixed set the Hessian is averaged over (class-balanced subset).")] = 512,
    split: Annotated[str, typer.Option(help="Split the examples come from.")] = "train",
    batch_size: Annotated[int, typer.Option(help="Examples per Hessian-vector product batch; the result does not depend on it.")] = 128,
    trace_method: Annotated[str, typer.Option(help="Trace estimator: hutchinson or hutchpp.")] = "hutchinson",
    trace_samples: Annotated[int, typer.Option(help="Probe vectors (Hutchinson) or products (Hutch++) for the trace.")] = 100,
    density_steps: Annotated[int, typer.Option(help="Lanczos steps per stochastic Lanczos quadrature run.")] = 100,
    density_runs: Annotated[int, typer.Option(help="Stochastic Lanczos quadrature runs averaged for the density.")] = 1,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Skip a quantity: eigenvalues, trace or density; repeat the option.")] = None,
    params: Annotated[Optional[list[str]], typer.Option("--params", help="Parameters: all, early, late, or name patterns (fnmatch); repeat for several patterns.")] = None,
    threshold: Annotated[Optional[str], typer.Option(help="Threshold block of the early/late split; default: the checkpoint's, else layer3.")] = None,
    weight_decay: Annotated[float, typer.Option(help="Add weight_decay * I to the Hessian (the L2 term of the training loss).")] = 0.0,
    float64: Annotated[bool, typer.Option("--float64", help="Compute in float64 on a private copy of the model.")] = False,
    engine: Annotated[str, typer.Option(help="default, or pyhessian (PyHessian 0.1 through a compatibility layer).")] = "default",
    allow_train_mode: Annotated[bool, typer.Option("--allow-train-mode", help="Accept BatchNorm in train mode or active dropout; the batches are then fixed.")] = False,
    finite_differences: Annotated[bool, typer.Option("--finite-differences", help="Use central differences of gradients where an operation has no double backward.")] = False,
    dataset: Dataset = None, data_root: DataRoot = None, convert_channels: ConvertChannels = False, resize: Resize = False,
    arch: Arch = None, model_def: ModelDef = None, num_classes: NumClasses = None, in_channels: InChannels = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, trust_checkpoint: Trust = False,
    allow_partial: Partial = False, ema: Ema = "auto", device: Device = None,
    out: Out = None, json_file: JsonFile = None, seed: Seed = 0, verbose: Verbose = False,
) -> None:
    """Measure the Hessian's top eigenvalues, trace and spectral density of the mean training loss."""
    _setup_logging(verbose)

    def body() -> None:
        from .hessian import plot_density, plot_top_eigenvalues
        from .hessian.analysis import LANCZOS_STARTS

        if lanczos_start not in LANCZOS_STARTS:
            raise ValueError(f"unknown --lanczos-start {lanczos_start!r}; choose gradient or random")
        target = _resolve_device(device)
        models = _load_all(checkpoints, _load_options(arch, model_def, num_classes, in_channels, input_size, mean, std, trust_checkpoint, allow_partial, ema, target))
        unknown = sorted(set(skip or []) - {"eigenvalues", "trace", "density"})
        if unknown:
            raise ValueError(f"unknown quantity {unknown[0]!r} for --skip; choose eigenvalues, trace or density")
        quantities = tuple(q for q in ("eigenvalues", "trace", "density") if q not in (skip or []))
        if not quantities:
            raise ValueError("--skip removed every quantity; skip at most two of eigenvalues, trace, density")
        data = DataOptions(dataset=dataset, root=data_root, convert_channels=convert_channels, resize=resize)
        options = HessianOptions(
            split=split, examples=examples, batch_size=batch_size, quantities=quantities, top_k=top_k,
            which="both" if smallest else "largest", method=method, tol=tol, lanczos_start=lanczos_start,
            trace_method=trace_method,
            trace_samples=trace_samples, density_steps=density_steps, density_runs=density_runs,
            params=tuple(params) if params else ("all",), threshold=threshold, weight_decay=weight_decay,
            float64=float64, engine=engine, allow_train_mode=allow_train_mode,
            finite_differences=finite_differences, seed=seed,
        )
        folder = out or Path("results") / "hessian"

        reports, records = {}, []
        for label, loaded in zip(unique_labels(models), models):
            report, record = measure_hessian(loaded, data, options, device=target)
            reports[label] = report
            records.append({"label": label, **record.to_dict()})

        summary = _write_summary(folder, "hessian.json", {"command": "hessian", "checkpoints": records}, json_file)
        written = [summary]
        if "density" in quantities:
            plot_density(reports, folder / "density.png")
            written.append(folder / "density.png")
        if "eigenvalues" in quantities:
            plot_top_eigenvalues(reports, folder / "eigenvalues.png")
            written.append(folder / "eigenvalues.png")

        typer.echo(f"{'checkpoint':<28} {'top eigenvalues':<44} {'trace (± s.e.)':>24}")
        for label, report in reports.items():
            top = ", ".join(f"{value:.4g}" for value in report.top_eigenvalues) or "-"
            trace = f"{report.trace.value:.4g} ± {report.trace.stderr:.2g}" if report.trace is not None else "-"
            typer.echo(f"{label:<28} {top:<44} {trace:>24}")
            if report.bottom_eigenvalues:
                typer.echo(f"{'':<28} most negative: {', '.join(f'{value:.4g}' for value in report.bottom_eigenvalues)}")
        typer.echo("wrote " + ", ".join(str(path) for path in written))

    run_command(body)


# ---------------------------------------------------------------- transfer


@app.command()
def transfer(
    checkpoints: Checkpoints,
    target: Annotated[str, typer.Option(help="Target dataset: digits, fashion-mnist-subset, fashion-mnist, imagefolder, or a torchvision dataset on disk (cifar10, flowers102, dtd, ...).")] = "digits",
    target_root: Annotated[Optional[str], typer.Option(help="Folder with the target's files.")] = None,
    layer: Annotated[str, typer.Option(help="Feature layer: penultimate (input of the last linear layer) or a module name.")] = "penultimate",
    few_shot: Annotated[bool, typer.Option(help="Also run N-way K-shot episodes.")] = True,
    n_way: Annotated[int, typer.Option(help="Classes per few-shot episode.")] = 5,
    k_shot: Annotated[int, typer.Option(help="Support examples per class and episode.")] = 5,
    n_query: Annotated[int, typer.Option(help="Query examples per class and episode.")] = 15,
    episodes: Annotated[int, typer.Option(help="Few-shot episodes.")] = 100,
    val_fraction: Annotated[float, typer.Option(help="Fraction of the target's train split held out to choose the regularisation strength.")] = 0.2,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 256,
    convert_channels: ConvertChannels = False, resize: Resize = False,
    arch: Arch = None, model_def: ModelDef = None, num_classes: NumClasses = None, in_channels: InChannels = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, trust_checkpoint: Trust = False,
    allow_partial: Partial = False, ema: Ema = "auto", device: Device = None,
    out: Out = None, json_file: JsonFile = None, seed: Seed = 0, verbose: Verbose = False,
) -> None:
    """Measure linear-probe and few-shot transfer of frozen features to a target dataset."""
    _setup_logging(verbose)

    def body() -> None:
        from .transfer import plot_transfer

        target_device = _resolve_device(device)
        models = _load_all(checkpoints, _load_options(arch, model_def, num_classes, in_channels, input_size, mean, std, trust_checkpoint, allow_partial, ema, target_device))
        data = DataOptions(convert_channels=convert_channels, resize=resize)
        options = TransferOptions(
            target=target, target_root=target_root, layer=layer, val_fraction=val_fraction, few_shot=few_shot,
            n_way=n_way, k_shot=k_shot, n_query=n_query, episodes=episodes, batch_size=batch_size, seed=seed,
        )
        folder = out or Path("results") / "transfer"

        results, records = {}, []
        for label, loaded in zip(unique_labels(models), models):
            result, record = measure_transfer(loaded, data, options, device=target_device)
            results[label] = result
            records.append({"label": label, **record.to_dict()})

        summary = _write_summary(folder, "transfer.json", {"command": "transfer", "checkpoints": records}, json_file)
        plot = plot_transfer(results, folder / "transfer.png")
        typer.echo(f"{'checkpoint':<28} {'linear probe':>12} {'C':>8} {'few-shot (95% CI)':>26}")
        for label, result in results.items():
            probe = result.linear_probe
            shot = result.few_shot
            shot_text = f"{shot.mean:.3f} ± {shot.ci95:.3f}" if shot is not None else "-"
            typer.echo(f"{label:<28} {probe.test_accuracy:>12.3f} {probe.chosen_c:>8.3g} {shot_text:>26}")
        typer.echo(f"wrote {summary} and {plot}")

    run_command(body)


# ---------------------------------------------------------------- layers


@app.command()
def layers(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file.", show_default=False)],
    patterns: Annotated[Optional[list[str]], typer.Option("--layers", help="Module-name patterns to resolve instead of the default list.")] = None,
    arch: Arch = None, model_def: ModelDef = None, num_classes: NumClasses = None, in_channels: InChannels = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, trust_checkpoint: Trust = False,
    allow_partial: Partial = False, ema: Ema = "auto", verbose: Verbose = False,
) -> None:
    """List the probe layers of a checkpoint's model, in execution order."""
    _setup_logging(verbose)

    def body() -> None:
        from .layers import probe_points

        loaded = load_model(checkpoint, **_load_options(arch, model_def, num_classes, in_channels, input_size, mean, std, trust_checkpoint, allow_partial, ema, "cpu"))
        require_eager_module(loaded, "layers")
        spec = loaded.input_spec
        for point in probe_points(loaded.model, patterns, input_shape=(spec.channels, spec.height, spec.width)):
            typer.echo(point.layer)

    run_command(body)


# ---------------------------------------------------------------- report and study

Strategies = Annotated[Optional[list[str]], typer.Option("--strategy", help="Strategy to train; repeat the option (default: normal, llf, seal).")]


def _report_options(device: str | None, skip: list[str] | None, target: str, target_root: str | None,
                    hessian_examples: int, support_size: int, query_size: int) -> "ReportOptions":
    from .report import ANALYSES, ReportOptions

    unknown = sorted(set(skip or []) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analysis {unknown[0]!r} for --skip; choose from {', '.join(ANALYSES)}")
    defaults = ReportOptions()
    return ReportOptions(
        depth=replace(defaults.depth, support_size=support_size, query_size=query_size),
        hessian=replace(defaults.hessian, examples=hessian_examples),
        transfer=replace(defaults.transfer, target=target, target_root=target_root),
        analyses=tuple(a for a in ANALYSES if a not in (skip or [])),
        device=_resolve_device(device),
    )


def _print_report(report) -> None:
    typer.echo(f"\nreport: {report.out_dir} ({report.computed} analyses computed, {report.reused} reused from the cache)\n")
    typer.echo(report.summary_markdown())
    typer.echo("files: " + ", ".join(path.name for path in report.files))


ReportSkip = Annotated[Optional[list[str]], typer.Option("--skip", help="Skip an analysis: depth, hessian or transfer; repeat the option.")]
ReportTarget = Annotated[str, typer.Option(help="Transfer target dataset (see `seal-probe transfer --help`).")]
ReportTargetRoot = Annotated[Optional[str], typer.Option(help="Folder with the transfer target's files.")]
HessianExamples = Annotated[int, typer.Option(help="Examples in the Hessian's fixed example set.")]
SupportSize = Annotated[int, typer.Option(help="Support examples of the depth probes.")]
QuerySize = Annotated[int, typer.Option(help="Query examples of the depth measurement.")]


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders written by seal-train (one per strategy).", show_default=False)],
    out: Annotated[Path, typer.Option(help="Report folder; per-checkpoint results are cached in its cache/ folder.")] = Path("report"),
    skip: ReportSkip = None, target: ReportTarget = "digits", target_root: ReportTargetRoot = None,
    hessian_examples: HessianExamples = 128, support_size: SupportSize = 1000, query_size: QuerySize = 500,
    device: Device = None, verbose: Verbose = False,
) -> None:
    """Analyse every generation of several runs and write a comparison: summary table and plots."""
    _setup_logging(verbose)

    def body() -> None:
        from .report import build_report

        options = _report_options(device, skip, target, target_root, hessian_examples, support_size, query_size)
        _print_report(build_report(run_dirs, out_dir=out, options=options))

    run_command(body)


@app.command()
def study(
    out: Annotated[Path, typer.Option(help="Study folder: runs/ contains the training runs, report/ the comparison.")] = Path("checkpoints") / "study",
    preset: Annotated[str, typer.Option(help="Training preset (see `seal-train presets`).")] = "demo",
    strategies: Strategies = None,
    skip: ReportSkip = None, target: ReportTarget = "digits", target_root: ReportTargetRoot = None,
    hessian_examples: HessianExamples = 128, support_size: SupportSize = 1000, query_size: QuerySize = 500,
    device: Device = None, verbose: Verbose = False,
) -> None:
    """Train normal, LLF and SEAL with one preset, then report on all their generations.

    A finished run already in the study folder is reused and an interrupted one is resumed, so
    the command can be run again after Ctrl-C.
    """
    _setup_logging(verbose)

    def body() -> int | None:
        from seal_train.config import resolve_config
        from seal_train.loop import NonFiniteLossError, TrainingInterrupted, resume, train
        from seal_train.runs import STATUS_FINISHED, holds_run, read_run

        from .report import build_report

        run_dirs = []
        for strategy in strategies or ["normal", "llf", "seal"]:
            config = resolve_config(preset=preset, overrides={"strategy": strategy, "out_dir": str(out / "runs"), "run_name": strategy})
            run_dir = config.run_dir
            try:
                if holds_run(run_dir) and (run_dir / "run.json").is_file() and read_run(run_dir).status == STATUS_FINISHED:
                    typer.echo(f"{strategy}: reusing the finished run in {run_dir}")
                elif holds_run(run_dir) and (run_dir / "latest.pt").is_file():
                    typer.echo(f"{strategy}: resuming the run in {run_dir}")
                    resume(run_dir)
                elif holds_run(run_dir):
                    raise ValueError(f"{run_dir} contains an unfinished run without latest.pt, so it cannot be resumed; delete the folder and run the study again")
                else:
                    typer.echo(f"{strategy}: training ({preset} preset) into {run_dir}")
                    train(config)
            except TrainingInterrupted:
                typer.echo(f"interrupted; run the same command again to resume {run_dir}", err=True)
                return 130
            except NonFiniteLossError as error:
                typer.echo(f"error: {error}", err=True)
                return 1
            run_dirs.append(run_dir)

        options = _report_options(device, skip, target, target_root, hessian_examples, support_size, query_size)
        _print_report(build_report(run_dirs, out_dir=out / "report", options=options))

    run_command(body)


def main() -> None:
    """Entry point of the `seal-probe` console script."""
    import warnings

    # torch.func's forward-mode decompositions call torch.jit.script, and loading a TorchScript
    # archive calls torch.jit.load; torch 2.14 warns about both on every use.
    warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
    app()


if __name__ == "__main__":
    main()
