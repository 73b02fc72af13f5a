"""Compare training runs: depth, Hessian and transfer on every generation checkpoint, tables and plots."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from seal_train.runs import RunFolderError, read_run, write_atomic, write_json_atomic

from . import __version__
from .analyses import DataOptions, DepthOptions, HessianOptions, TransferOptions, measure_depth, measure_hessian, measure_transfer
from .loading import LoadedModel, load_model

log = logging.getLogger(__name__)

ANALYSES = ("depth", "hessian", "transfer")
CACHE_FOLDER = "cache"


class ReportError(ValueError):
    """A run folder that cannot be reported on."""


@dataclass(frozen=True)
class ReportOptions:
    """Settings of every analysis in a report; the defaults fit the demo study on 2 CPU cores.

    Compared with the single-analysis commands the defaults are lighter (fewer support
    examples, Hessian examples and Lanczos steps), because a report analyses every generation
    of every run. Every value is recorded in the report and in each cached result.
    """

    data: DataOptions = DataOptions()
    depth: DepthOptions = DepthOptions(support_size=1000, query_size=500)
    hessian: HessianOptions = HessianOptions(examples=128, top_k=5, trace_method="hutchpp", trace_samples=24, density_steps=32)
    transfer: TransferOptions = TransferOptions(target="digits", episodes=100)
    transfer_resize: bool = True
    analyses: tuple[str, ...] = ANALYSES
    device: str = "cpu"


@dataclass
class CheckpointEntry:
    """One generation checkpoint of a run and what the run recorded about it."""

    run: str
    strategy: str
    generation: int
    path: Path
    val_acc: float | None
    group: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.run}-gen{self.generation}"


# ---------------------------------------------------------------- runs


def _generation_accuracy(history: list, generation: int) -> float | None:
    epochs = [entry for entry in history if entry.generation == generation]
    return float(epochs[-1].val_acc) if epochs else None


def collect_checkpoints(run_dirs: list[Path]) -> list[CheckpointEntry]:
    """List the end-of-generation checkpoints of every run folder, in run and generation order."""
    entries: list[CheckpointEntry] = []
    names = set()
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        try:
            record = read_run(run_dir)
        except RunFolderError as error:
            raise ReportError(str(error)) from error
        generations = sorted((c for c in record.checkpoints if c.kind == "generation"), key=lambda c: c.generation)
        if not generations:
            raise ReportError(f"run folder {run_dir} has no generation checkpoints; let the run finish a generation or check the path")

        name = record.run_name if record.run_name not in names else f"{run_dir.parent.name}-{record.run_name}"
        names.add(name)
        config = record.config
        group = f"{record.dataset.get('name', config.get('dataset'))} / {config.get('arch')}"
        for checkpoint in generations:
            # run.json stores paths relative to the run folder, so a moved folder still works.
            path = run_dir / checkpoint.path
            if not path.is_file():
                raise ReportError(f"{run_dir}: checkpoint {path} listed in run.json is missing; re-run or resume the training")
            entries.append(CheckpointEntry(
                run=name, strategy=record.strategy, generation=checkpoint.generation, path=path,
                val_acc=_generation_accuracy(record.history, checkpoint.generation), group=group,
            ))
    return entries


# ---------------------------------------------------------------- cache


def _cache_key(analysis: str, loaded: LoadedModel, options: ReportOptions) -> dict[str, Any]:
    """Everything a cached result depends on: the checkpoint's bytes, the data and the analysis settings."""
    settings = {"depth": options.depth, "hessian": options.hessian, "transfer": options.transfer}[analysis]
    data = replace(options.data, resize=options.data.resize or (analysis == "transfer" and options.transfer_resize))
    return {
        "analysis": analysis,
        "checkpoint_sha256": loaded.sha256,
        "data": asdict(data),
        "options": json.loads(json.dumps(asdict(settings))),
        "seal_suite": __version__,
    }


def cached_result(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Return (result, computed): the cached result when its key equals key, otherwise a new one, cached.

    A cache file written with other settings, another checkpoint or another release is never
    reused; it is recomputed and replaced.
    """
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            cached = None
        if cached is not None and cached.get("key") == key:
            return cached["result"], False
        log.info("recomputing %s: the cached result was made with other settings or another checkpoint", path.name)

    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "result": result})
    return result, True


def analyse_checkpoint(entry: CheckpointEntry, options: ReportOptions, cache_dir: Path) -> int:
    """Fill entry.results with every requested analysis, from the cache where possible; return how many were computed."""
    loaded = load_model(entry.path, map_location=options.device)
    computed = 0
    for analysis in options.analyses:
        key = _cache_key(analysis, loaded, options)
        data = DataOptions(**key["data"])

        def compute() -> dict[str, Any]:
            log.info("%s: computing %s", entry.label, analysis)
            if analysis == "depth":
                return measure_depth(loaded, data, options.depth, device=options.device)[1].to_dict()
            if analysis == "hessian":
                return measure_hessian(loaded, data, options.hessian, device=options.device)[1].to_dict()
            return measure_transfer(loaded, data, options.transfer, device=options.device)[1].to_dict()

        record, fresh = cached_result(cache_dir / f"{entry.label}.{analysis}.json", key, compute)
        entry.results[analysis] = record["result"]
        computed += int(fresh)
    return computed


# ---------------------------------------------------------------- table


TABLE_COLUMNS = [
    ("strategy", "Strategy"),
    ("generation", "Generation"),
    ("val_acc", "Validation accuracy"),
    ("mean_depth", "Mean prediction depth"),
    ("mean_depth_ci95", "Depth 95% CI"),
    ("never_consistent", "Never consistent"),
    ("top_eigenvalue", "Top eigenvalue"),
    ("min_top_eigenvalue", "5th eigenvalue"),
    ("trace", "Hessian trace"),
    ("transfer_accuracy", "Linear-probe accuracy"),
    ("few_shot_accuracy", "Few-shot accuracy"),
]


def table_row(entry: CheckpointEntry) -> dict[str, Any]:
    """Collect one table row from an entry's analysis results; a missing analysis gives None."""
    depth = entry.results.get("depth", {})
    hessian = entry.results.get("hessian", {})
    transfer = entry.results.get("transfer", {})
    top = hessian.get("top_eigenvalues") or []
    trace = hessian.get("trace") or {}
    few_shot = transfer.get("few_shot") or {}
    return {
        "run": entry.run,
        "strategy": entry.strategy,
        "generation": entry.generation,
        "group": entry.group,
        "val_acc": entry.val_acc,
        "mean_depth": depth.get("mean_depth"),
        "mean_depth_ci95": depth.get("mean_depth_ci95"),
        "never_consistent": depth.get("fraction_never_consistent"),
        "top_eigenvalue": top[0] if top else None,
        "min_top_eigenvalue": top[-1] if top else None,
        "trace": trace.get("value"),
        "trace_stderr": trace.get("stderr"),
        "transfer_accuracy": (transfer.get("linear_probe") or {}).get("test_accuracy"),
        "few_shot_accuracy": few_shot.get("mean"),
        "few_shot_ci95": few_shot.get("ci95"),
    }


def _format(key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    if key in ("val_acc", "transfer_accuracy", "never_consistent"):
        return f"{100 * value:.2f}%"
    if key == "few_shot_accuracy":
        return f"{100 * value:.2f}% ± {100 * row['few_shot_ci95']:.2f}"
    if key == "mean_depth_ci95":
        return f"[{value[0]:.2f}, {value[1]:.2f}]"
    if key == "trace":
        return f"{value:.4g} ± {row['trace_stderr']:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [header, rule]
    lines += ["| " + " | ".join(_format(key, row) for key, _ in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    fields = ["group", "run", "strategy", "generation", "val_acc", "mean_depth", "mean_depth_ci95_low", "mean_depth_ci95_high",
              "never_consistent", "top_eigenvalue", "min_top_eigenvalue", "trace", "trace_stderr",
              "transfer_accuracy", "few_shot_accuracy", "few_shot_ci95"]
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        ci = row.get("mean_depth_ci95") or (None, None)
        writer.writerow({**row, "mean_depth_ci95_low": ci[0], "mean_depth_ci95_high": ci[1]})
    return stream.getvalue()


# ---------------------------------------------------------------- report


@dataclass
class Report:
    """Result of build_report: files written, table rows per group, and analyses computed and reused."""

    out_dir: Path
    groups: dict[str, list[dict[str, Any]]]
    files: list[Path]
    computed: int
    reused: int

    def summary_markdown(self) -> str:
        return "\n".join(f"{group}\n\n{markdown_table(rows)}" for group, rows in self.groups.items())


def _write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda stream: stream.write(text.encode("utf-8")))


def _group_suffix(index: int, groups: dict) -> str:
    return "" if len(groups) == 1 else f"-group{index + 1}"


def build_report(run_dirs: list[Path], *, out_dir: Path, options: ReportOptions = ReportOptions()) -> Report:
    """Analyse every generation checkpoint of the runs (cached), then write tables and plots to out_dir.

    Runs that differ in dataset or architecture are reported as separate groups, with one table
    section and one set of plots each, and never averaged together.
    """
    from .plots import write_report_plots

    unknown = sorted(set(options.analyses) - set(ANALYSES))
    if unknown:
        raise ReportError(f"unknown analysis {unknown[0]!r}; choose from {', '.join(ANALYSES)}")
    entries = collect_checkpoints(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    computed = 0
    for position, entry in enumerate(entries, start=1):
        log.info("checkpoint %d of %d: %s (%s)", position, len(entries), entry.label, entry.path)
        computed += analyse_checkpoint(entry, options, out_dir / CACHE_FOLDER)
    reused = len(entries) * len(options.analyses) - computed

    groups: dict[str, list[CheckpointEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.group, []).append(entry)
    if len(groups) > 1:
        log.warning("the runs use %d dataset/architecture combinations (%s); each is reported as its own group", len(groups), "; ".join(groups))

    files: list[Path] = []
    rows = {group: [table_row(entry) for entry in members] for group, members in groups.items()}
    markdown = "# Study summary\n\n" + "\n".join(f"## {group}\n\n{markdown_table(group_rows)}" for group, group_rows in rows.items())
    files.append(_write_text(out_dir / "summary.md", markdown))
    files.append(_write_text(out_dir / "summary.csv", csv_table([row for group_rows in rows.values() for row in group_rows])))

    for index, (group, members) in enumerate(groups.items()):
        files += write_report_plots(members, out_dir, suffix=_group_suffix(index, groups), group=group)

    write_json_atomic(out_dir / "report.json", {
        "runs": [str(path) for path in run_dirs],
        "options": json.loads(json.dumps(asdict(options))),
        "groups": {group: group_rows for group, group_rows in rows.items()},
        "computed": computed,
        "reused": reused,
        "seal_suite": __version__,
    })
    files.append(out_dir / "report.json")
    log.info("report in %s: %d analyses computed, %d reused from the cache", out_dir, computed, reused)
    return Report(out_dir=out_dir, groups=rows, files=files, computed=computed, reused=reused)
