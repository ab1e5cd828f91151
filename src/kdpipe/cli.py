"""The ``kdpipe`` command: one subcommand per step, ``run`` for all of them, ``params``.

Thin on purpose: parse options, load the config, call the step through tracking, print.
A ``KdpipeError`` becomes one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kdpipe import __version__
from kdpipe.atomic import write_json
from kdpipe.config import Config, defaults_yaml, load_config, to_yaml
from kdpipe.errors import KdpipeError
from kdpipe.pipeline import STEPS, Step

app = typer.Typer(
    help="Distil a large text classifier into a small, fast one, and ship it.\n\n"
    "Settings come from ./params.yaml (every key has a default); override any of them with "
    "-S key=value, e.g. -S data.source=reviews.csv -S seed=1.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ParamsOpt = Annotated[
    Path | None,
    typer.Option("--params", "-p", help="params file [default: ./params.yaml if present]",
                 show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", metavar="KEY=VALUE",
                 help="Override a setting, e.g. -S ingest.max_length=64 (repeatable)."),
]

DEMO_NOTICE = (
    "[yellow]Using the small DEMO data set shipped with kdpipe (450 made-up product reviews); "
    "its numbers say nothing about real data.[/] Point kdpipe at yours with "
    "-S data.source=path/to/data.csv (or a folder, or a Hugging Face dataset id)."
)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdpipeError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"kdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """kdpipe: knowledge-distillation pipeline."""


def _run_step(step: Step, cfg: Config) -> Any:
    from kdpipe import tracking

    # No spinner here: steps draw their own progress bars, and rich allows one live display.
    err.print(f"[bold]▶ {step.name}[/] [dim]{step.help}[/]", highlight=False)
    result = tracking.step_run(cfg, step.name, lambda log: step.call(cfg, log))
    write_json(cfg.paths.metrics / f"{step.name}.json", result.metrics)
    err.print(f"[green]✓[/] {step.name}: {result.summary}", highlight=False)
    return result


def _register_step(step: Step) -> None:
    @friendly_errors
    def command(params: ParamsOpt = None, set_: SetOpt = None) -> None:
        cfg = load_config(params, set_)
        if step.name == "ingest" and cfg.data.source == "demo":
            err.print(DEMO_NOTICE)
        _run_step(step, cfg)

    command.__doc__ = step.help
    app.command(step.command, help=step.help)(command)


for _step in STEPS:
    _register_step(_step)


@app.command()
@friendly_errors
def run(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Run every step in order, tracked as one MLflow parent run, and print a summary."""
    from kdpipe import tracking

    cfg = load_config(params, set_)
    if cfg.data.source == "demo":
        err.print(DEMO_NOTICE)
    rows = []
    with tracking.pipeline_run(cfg) as run_id:
        for index, step in enumerate(STEPS, start=1):
            err.print(f"[dim]step {index}/{len(STEPS)}[/]", end=" ")
            start = time.perf_counter()
            result = _run_step(step, cfg)
            rows.append((step.name, f"{time.perf_counter() - start:.1f}", result.summary))
    table = Table(title="kdpipe run")
    for column in ("step", "seconds", "result"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if run_id:
        from kdpipe.tracking import tracking_uri

        out.print(f"MLflow run {run_id} in {tracking_uri(cfg)} "
                  f"(browse: mlflow ui --backend-store-uri {tracking_uri(cfg)})",
                  highlight=False, soft_wrap=True)


@app.command()
@friendly_errors
def predict(
    texts: Annotated[list[str], typer.Argument(help="Texts to classify.")],
    model: Annotated[Path, typer.Option(help="An exported or quantized model folder.")] = Path(
        "work/quantized"),
) -> None:
    """Classify texts with an exported model; prints one JSON object per text."""
    import json

    from kdpipe.serve import Predictor

    for text, prediction in zip(texts, Predictor(model).predict(texts), strict=True):
        typer.echo(json.dumps({"text": text, **prediction.to_dict()}, ensure_ascii=False))


@app.command()
@friendly_errors
def params(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    defaults: Annotated[bool, typer.Option(help="Print the built-in defaults instead.")] = False,
) -> None:
    """Print the settings in effect (params file + overrides), as YAML."""
    # Plain stdout, not rich: rich wraps long lines, which would corrupt redirected YAML.
    if defaults:
        typer.echo(defaults_yaml(), nl=False)
        return
    typer.echo(to_yaml(load_config(params, set_)), nl=False)


if __name__ == "__main__":
    app()
