"""The `seal-train` commands: run, resume, presets and strategies (loaded by seal_train.cli.main)."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Optional

import typer

from .checkpoint import CheckpointError
from .config import PRESET_DESCRIPTIONS, PRESETS, ConfigError, config_fields, field_types, preset_config, read_config_file, resolve_config
from .data import DatasetError
from .distributed import DeviceError
from .loop import NonFiniteLossError, RunResult, TrainingInterrupted, resume, train
from .models import ModelError
from .runs import RunFolderError, describe_os_error
from .strategies import STRATEGIES, StrategyError

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
INPUT_ERRORS = (ConfigError, DatasetError, ModelError, StrategyError, RunFolderError, DeviceError, CheckpointError)

# Plain click help: rich's option table cuts long option names and values with "…" on an
# 80-column terminal or a pipe, while click wraps the help text and keeps every name whole.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
    help="Train image classifiers for several generations with the normal, LLF or SEAL strategy.",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_parameters() -> list[inspect.Parameter]:
    """Build one keyword-only CLI option per TrainConfig field, defaulting to None (not given)."""
    hints = field_types()
    parameters = []
    for config_field in config_fields():
        hint = hints[config_field.name]
        allowed = [t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)]
        base = allowed[0]
        if base is bool:
            declaration = f"{_flag(config_field.name)}/--no-{config_field.name.replace('_', '-')}"
        else:
            declaration = _flag(config_field.name)
        option_type = str if base is dict else base
        option = typer.Option(None, declaration, help=config_field.metadata["help"], show_default=False)
        parameters.append(inspect.Parameter(config_field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[option_type]))
    return parameters


def _flag_values(options: dict[str, Any]) -> dict[str, Any]:
    """Keep the config options given on the command line and parse the JSON-valued ones."""
    flag_values = {key: value for key, value in options.items() if value is not None}
    if "arch_kwargs" in flag_values:
        try:
            flag_values["arch_kwargs"] = json.loads(flag_values["arch_kwargs"])
        except json.JSONDecodeError as error:
            raise ConfigError(f"--arch-kwargs must be a JSON object, got {flag_values['arch_kwargs']!r}: {error}") from error
    return flag_values


def _print_summary(result: RunResult) -> None:
    typer.echo(f"run folder: {result.run_dir}")
    typer.echo(f"strategy: {result.strategy}, status: {result.status}, wall time: {result.wall_time:.0f} s")
    for generation, accuracy in enumerate(result.generation_val_acc):
        typer.echo(f"generation {generation}: final validation accuracy {100 * accuracy:.2f}%")


def _run_and_report(action) -> None:
    """Run a training action and turn its errors into one message line and an exit code."""
    try:
        result = action()
    except INPUT_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from error
    except NonFiniteLossError as error:
        typer.echo(f"error: {error}; the checkpoints written before it are kept. Lower --lr or check the data", err=True)
        raise typer.Exit(EXIT_FAILED) from error
    except TrainingInterrupted as interrupted:
        typer.echo(f"interrupted: {interrupted}. Resume with: seal-train resume {interrupted.run_dir}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from interrupted
    except KeyboardInterrupt as error:
        # Ctrl-C while the data loads or the model is built. train() and resume() turn Ctrl-C
        # into TrainingInterrupted only once the epoch loop runs.
        typer.echo("interrupted before training started; no checkpoint was written", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from error
    except OSError as error:
        # A full disk, a lost mount or a missing permission. When it stops the epoch loop,
        # train() and resume() have already marked run.json as failed.
        typer.echo(f"error: {describe_os_error(error)}; fix the cause, then resume the run or start it again with --overwrite", err=True)
        raise typer.Exit(EXIT_FAILED) from error
    _print_summary(result)


def run(**options: Any) -> None:
    """Train a new run (or continue one with --resume); with no options, SEAL on the demo preset."""
    config_file: Optional[Path] = options.pop("config")
    resume_run: bool = options.pop("resume")
    overwrite: bool = options.pop("overwrite")

    def action() -> RunResult:
        flag_values = _flag_values(options)
        if resume_run and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other; pass one of them")
        config = resolve_config(preset=flag_values.pop("preset", None), config_file=config_file, overrides=flag_values)
        if resume_run:
            file_values = read_config_file(config_file) if config_file else {}
            return resume(config.run_dir, overrides={**file_values, **flag_values})
        return train(config, overwrite=overwrite)

    _run_and_report(action)


run.__signature__ = inspect.Signature(
    [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="JSON or TOML file of options; flags override it, it overrides the preset.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--resume", help="Continue the run in <out-dir>/<run-name> from its latest.pt.")),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--overwrite", help="Replace a run already in <out-dir>/<run-name>.")),
        *_config_parameters(),
    ]
)
app.command("run")(run)


@app.command("resume")
def resume_command(
    run_dir: Path = typer.Argument(..., help="Run folder that contains latest.pt, config.json and run.json."),
    device: Optional[str] = typer.Option(None, "--device", help="Device to continue on (auto, cpu, cuda, cuda:<index>)."),
) -> None:
    """Continue an interrupted run exactly where it stopped."""
    overrides = {"device": device} if device else {}
    _run_and_report(lambda: resume(run_dir, overrides=overrides))


@app.command("presets")
def presets_command() -> None:
    """List the presets and every value they set."""
    for name in PRESETS:
        typer.echo(f"{name}: {PRESET_DESCRIPTIONS.get(name, '')}")
        for key, value in preset_config(name).to_dict().items():
            typer.echo(f"  {key} = {json.dumps(value)}")


@app.command("strategies")
def strategies_command() -> None:
    """List the strategies with a one-line description each."""
    width = max(len(name) for name in STRATEGIES)
    for name, strategy in STRATEGIES.items():
        typer.echo(f"{name:<{width}}  {strategy.description}")
