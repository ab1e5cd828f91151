"""The ``kdpipe`` command: one subcommand per step, ``run`` for all of them, ``params``.

Thin on purpose: parse options, load the config, call the step through tracking, print.
A ``KdpipeError`` becomes one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdpipe import __version__
from kdpipe.atomic import write_json
from kdpipe.config import Config, defaults_yaml, load_config, to_yaml
from kdpipe.errors import KdpipeError
from kdpipe.interrupts import Interrupted, as_interrupts
from kdpipe.pipeline import STEPS, Step, step_named
from kdpipe.work_lock import work_dir_lock

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
    typer.Option("--params", "-p", help="params file \\[default: ./params.yaml if present]",
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


# The step running now, for the line an interruption prints: (step, work_dir layout, the
# command that resumes it).
_current: dict[str, Any] = {}


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with as_interrupts():
                return fn(*args, **kwargs)
        except KdpipeError as exc:
            # Escaped: messages hold literal brackets (kdpipe[gcs], hf:x[train]).
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            err.print(f"[red]{escape(_interrupted_line(exc))}[/]", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(exc.exit_code if isinstance(exc, Interrupted) else 130) from None
        finally:
            _current.clear()

    return wrapper


def _interrupted_line(exc: KeyboardInterrupt) -> str:
    """One line: what stopped, where, and how to go on."""
    from kdpipe import provenance

    signal_name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
    step: Step | None = _current.get("step")
    if step is None:
        return f"interrupted ({signal_name})"
    where = provenance.checkpoint_text(_current["paths"], step)
    again = (f"{step.name} resumes from its checkpoint ({where})" if where else
             f"{step.name} starts over")
    resume = _current["resume"]
    then = (f"`{resume}` keeps the finished steps and {again}" if resume == "kdpipe run"
            else f"`{resume}` again: {again}")
    killed = "MLflow runs ended KILLED; " if _current["tracked"] else ""
    return f"interrupted ({signal_name}) during {step.name}; {killed}{then}"


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


def _run_step(step: Step, cfg: Config, command: str, why: str | None = None,
              pipeline_run_id: str | None = None) -> Any:
    """Run ``step`` tracked, its provenance recorded (``kdpipe.provenance``)."""
    from kdpipe import provenance, tracking

    _current.update(step=step, paths=cfg.paths, resume=command, tracked=cfg.tracking.enabled)
    # No spinner here: steps draw their own progress bars, and rich allows one live display.
    err.print(f"[bold]▶ {step.name}[/] [dim]{step.help}[/]", highlight=False)
    if why:
        where = provenance.checkpoint_text(cfg.paths, step)
        resumes = (f"; resumes from the checkpoint an interrupted run left ({where}) if it "
                   "was made from the same data and settings" if where else "")
        err.print(f"  [dim]runs: {escape(why)}{resumes}[/]", highlight=False)
    run = provenance.RunInfo(command, pipeline_run_id=pipeline_run_id)
    provenance.started(cfg, step, run)
    seen: dict[str, str | None] = {}

    def call(log: Any) -> Any:
        seen["run"] = tracking.current_run_id()
        return step.call(cfg, log)

    result = tracking.step_run(cfg, step.name, call)
    write_json(cfg.paths.metrics / f"{step.name}.json", result.metrics)
    provenance.finished(cfg, step, replace(run, mlflow_run_id=seen.get("run")))
    _current.clear()
    err.print(f"[green]✓[/] {step.name}: {result.summary}", highlight=False)
    return result


def _register_step(step: Step) -> None:
    @friendly_errors
    def command(params: ParamsOpt = None, set_: SetOpt = None) -> None:
        from kdpipe import provenance

        cfg = load_config(params, set_)
        if step.name == "ingest" and cfg.data.source == "demo":
            err.print(DEMO_NOTICE)
        with work_dir_lock(cfg.work_dir, f"kdpipe {step.command}"):
            if step.name == "register":  # what it reads must be of one run
                provenance.check_consistent(
                    cfg.paths, [provenance.producer(f) for f in step.folders], "register")
            _run_step(step, cfg, f"kdpipe {step.command}")

    command.__doc__ = step.help
    app.command(step.command, help=step.help)(command)


for _step in STEPS:
    _register_step(_step)


class Runner(str, Enum):
    local = "local"
    kfp_local = "kfp-local"
    kfp_docker = "kfp-docker"


@app.command()
@friendly_errors
def run(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    runner: Annotated[Runner, typer.Option(
        help="local: each step in this process. kfp-local: the Kubeflow DAG, one subprocess "
        "per task (kfp.local, offline). kfp-docker: the same DAG, each task in a container of "
        "kfp.cpu_image (docker/build.sh --local-base --no-push builds it; a local MLflow "
        "store is served for the run). Same outputs under work_dir.")] = Runner.local,
    force: Annotated[bool, typer.Option(
        "--force", help="Re-run every step, even those whose output is up to date.")] = False,
    from_step: Annotated[str | None, typer.Option(
        "--from", metavar="STEP", show_default=False,
        help="Re-run STEP and every step after it (e.g. --from distill after changing the "
        "code); earlier steps only if stale.")] = None,
    to_step: Annotated[str | None, typer.Option(
        "--to", metavar="STEP", show_default=False,
        help="Stop after STEP (e.g. --to distill for a teacher assistant: the later steps "
        "are not needed).")] = None,
) -> None:
    """Run the steps in order, tracked as one MLflow parent run, and print a summary.

    Like `dvc repro`, a step whose output is up to date is kept: same settings, same kdpipe
    version, and inputs with the content they had when it ran (work_dir/provenance/ records
    it). The others re-run, each saying why; teacher and distill resume from the checkpoint
    an interrupted run left. Only one kdpipe command writes into a work_dir at a time.
    """
    from kdpipe import provenance

    cfg = load_config(params, set_)
    first, last = _step_option(from_step, "--from"), _step_option(to_step, "--to")
    steps = STEPS[:STEPS.index(last) + 1] if last else STEPS
    if first and first not in steps:
        raise KdpipeError(f"--from {from_step} comes after --to {to_step}")
    if cfg.data.source == "demo":
        err.print(DEMO_NOTICE)
    with work_dir_lock(cfg.work_dir, f"kdpipe run --runner {runner.value}"):
        if runner is not Runner.local:
            if last:
                raise KdpipeError(f"--to works with --runner local only (the Kubeflow DAG "
                                  f"runs whole); got --runner {runner.value}")
            _run_kfp(cfg, runner)
            return
        forced = {s.name for s in steps} if force else (
            {s.name for s in steps[steps.index(first):]} if first else set())
        # Why each step up to the first stale one must run (None: up to date); nothing runs
        # before that one, so the loop reuses these instead of checking them again.
        checked: dict[str, str | None] = {}
        if not forced:
            for step in steps:
                checked[step.name] = provenance.stale(cfg, step)
                if checked[step.name] is not None:
                    break
            else:
                err.print(f"every step{f' to {last.name}' if last else ''} is up to date "
                          "(--force re-runs them); the last run's results:", highlight=False)
                _print_comparison(cfg)
                run = (provenance.read(cfg.paths.root, steps[-1].name) or {}).get(
                    "pipeline_run_id")
                if run and cfg.tracking.enabled:
                    _print_mlflow_run(cfg, run)
                return
        rows, run_id = _run_stale(cfg, forced, checked, steps)
    table = Table(title="kdpipe run")
    for column in ("step", "seconds", "result"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    _print_comparison(cfg)
    if run_id:
        _print_mlflow_run(cfg, run_id)


def _step_option(name: str | None, option: str) -> Step | None:
    if name is None:
        return None
    names = [s.name for s in STEPS]
    wanted = name.replace("-", "_")
    if wanted not in names:
        raise KdpipeError(f"{option} {name}: no such step; one of {', '.join(names)}")
    return step_named(wanted)


def _run_stale(cfg: Config, forced: set[str], checked: dict[str, str | None],
               steps: tuple[Step, ...] = STEPS) -> tuple[list[tuple[str, ...]], str | None]:
    """Each of ``steps`` in order inside one parent run: the stale (or ``forced``) ones run,
    the others are kept (``checked``: steps already found stale or not). Register runs
    whenever anything before it ran."""
    from kdpipe import provenance, tracking

    rows: list[tuple[str, ...]] = []
    ran = False
    with tracking.pipeline_run(cfg) as run_id:
        for index, step in enumerate(steps, start=1):
            err.print(f"[dim]step {index}/{len(steps)}[/]", end=" ")
            why = "forced (--force or --from)" if step.name in forced else \
                checked[step.name] if step.name in checked else provenance.stale(cfg, step)
            if why is None and ran and step.name in provenance.ALWAYS:
                why = "steps before it ran: it records this run's outcome in MLflow"
            if why is None:
                kept = provenance.up_to_date_text(cfg, step)
                err.print(f"[green]✓[/] {step.name}: {escape(kept)}", highlight=False)
                rows.append((step.name, "–", kept))
                continue
            start = time.perf_counter()
            result = _run_step(step, cfg, "kdpipe run", why, run_id)
            ran = True
            rows.append((step.name, f"{time.perf_counter() - start:.1f}", result.summary))
    return rows, run_id


def _print_comparison(cfg: Config) -> None:
    """The evaluate step's side-by-side table, compact: what a run is for."""
    import json

    from kdpipe.steps.evaluate import ratio_text

    path = cfg.paths.evaluation / "metrics.json"
    if not path.is_file():
        return
    doc = json.loads(path.read_text(encoding="utf-8"))
    table = Table(title=f"models on {doc['rows']:,} {doc['split']} rows "
                        f"(full table: {cfg.paths.evaluation / 'comparison.md'})")
    for column in ("model", "accuracy", "macro-F1", "p50 b1 ms", "size MB", "speed-up",
                   "size / teacher"):
        table.add_column(column, justify="left" if column == "model" else "right",
                         no_wrap=column == "model")
    for name, m in doc["models"].items():
        vs = m.get("vs_teacher") or {}
        b1 = m["latency_ms"].get("b1", {}).get("p50")
        table.add_row(name, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}",
                      "–" if b1 is None else f"{b1:.2f}", f"{m['size_bytes'] / 1e6:.2f}",
                      ratio_text(vs.get("speedup_b1_p50"), "–"), ratio_text(vs.get("size"), "–"))
    out.print(table)


def _print_mlflow_run(cfg: Config, run_id: str) -> None:
    from kdpipe.tracking import redact, run_page, tracking_uri

    uri = tracking_uri(cfg)
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        out.print(f"MLflow run: {run_page(uri, run_id)}", highlight=False, soft_wrap=True)
        return
    out.print(f"MLflow run {run_id} in {shown}: `mlflow ui --backend-store-uri {shown}`, then "
              f"open {run_page('http://127.0.0.1:5000', run_id, uri)}", highlight=False,
              soft_wrap=True)


def _run_kfp(cfg: Config, runner: Runner) -> None:
    """The DAG with kfp.local: in subprocesses (kfp-local) or containers (kfp-docker)."""
    from kdpipe import provenance

    if runner is Runner.kfp_docker:
        from kdpipe.kfp.docker import run_in_docker as run_dag
        where = f"in containers of {cfg.kfp.cpu_image}"
    else:
        from kdpipe.kfp.local import run_local as run_dag
        where = "in local subprocesses"
    name = runner.value
    log_path = cfg.paths.root / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    err.print(f"[bold]▶ {name}[/] [dim]the Kubeflow DAG {where}; kfp's log: {log_path}[/]",
              highlight=False)
    # The DAG's outputs replace work_dir's without kdpipe's records (Kubeflow keeps its own
    # lineage): forget the old ones, so nothing is judged by a record of other folders.
    provenance.clear(cfg.paths.root)
    with log_path.open("w", encoding="utf-8") as log:
        done = run_dag(cfg, log=log)
    table = Table(title=f"kdpipe run --runner {name}")
    table.add_column("step")
    table.add_column("output")
    for step, folder in done.outputs.items():
        table.add_row(step, str(folder))
    out.print(table)
    out.print("registered: yes" if done.registered else
              "registered: no (the gate refused; see the log)")
    if done.mlflow_run_id:
        _print_mlflow_run(cfg, done.mlflow_run_id)


@app.command("compile")
@friendly_errors
def compile_(
    output: Annotated[Path, typer.Option("--output", "-o", help="IR YAML to write.")] = Path(
        "pipelines/kdpipe.yaml"),
    components: Annotated[Path | None, typer.Option(
        help="Folder for each component compiled on its own, with a README (reuse one step "
        "in your own pipeline).")] = Path("components"),
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Compile the Kubeflow pipeline (IR YAML, with the cluster wiring of kfp.*) and each
    component, with params.yaml's values as their defaults."""
    from kdpipe.kfp.catalog import write_components
    from kdpipe.kfp.pipeline import compile_pipeline

    cfg = load_config(params, set_)
    path = compile_pipeline(output, cfg)
    out.print(f"wrote {path}", highlight=False)
    if components is not None:
        written = write_components(cfg, components)
        out.print(f"wrote {len(written)} components to {components}/", highlight=False)


@app.command()
@friendly_errors
def submit(
    host: Annotated[str, typer.Option(
        help="Kubeflow Pipelines endpoint, e.g. http://localhost:8080 (kubectl port-forward) "
        "or https://kubeflow.example.com/pipeline.", show_default=False)],
    experiment: Annotated[str, typer.Option(help="KFP experiment to file the run under.")] = (
        "kdpipe"),
    run_name: Annotated[str | None, typer.Option(help="Name of the run.")] = None,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Rerun every task instead of reusing cached results.")] = False,
    namespace: Annotated[str | None, typer.Option(
        help="Kubeflow profile namespace (multi-user installs).")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Start the pipeline on a Kubeflow cluster with these settings.

    Credentials come from the environment only: KF_PIPELINES_TOKEN (a bearer token) or
    KF_PIPELINES_SA_TOKEN_PATH (a service-account token file). MLflow must be a server the
    pods can reach: -S tracking.uri=http://mlflow.example:5000.
    """
    from kdpipe.kfp.submit import submit as submit_run

    cfg = load_config(params, set_)
    done = submit_run(host, experiment, cfg, run_name=run_name,
                      enable_caching=False if no_cache else None, namespace=namespace)
    out.print(f"run {done.run_id} in experiment {done.experiment}: {done.url}",
              highlight=False, soft_wrap=True)


@app.command()
@friendly_errors
def predict(
    texts: Annotated[list[str], typer.Argument(help="Texts to classify.")],
    model: Annotated[Path, typer.Option(help="An exported or quantized model folder.")] = Path(
        "work/quantized"),
) -> None:
    """Classify texts with an exported model; prints one JSON object per text.

    A folder in a work_dir is refused when it was made from a mix of runs (e.g. an old
    student after an interrupted run re-made the teacher): `kdpipe run` brings it up to date.
    """
    import json

    from kdpipe import provenance
    from kdpipe.serving.predictor import Predictor

    owned = provenance.owning_step(model)
    if owned is not None:
        provenance.check_consistent(owned[0], [owned[1]], f"kdpipe predict --model {model}")

    for text, prediction in zip(texts, Predictor(model).predict(texts), strict=True):
        typer.echo(json.dumps({"text": text, **prediction.to_dict()}, ensure_ascii=False))


@app.command(
    epilog="Trials re-run distill (and fractionate, when one of its settings is searched) "
    "from the work_dir's soft labels, so run `kdpipe run` first. Settings given with -S "
    "apply to every trial; only the searched ones are written back.")
@friendly_errors
def tune(
    minutes: Annotated[float | None, typer.Option(
        min=0.01, show_default=False,
        help="Budget: start no trial after this many minutes \\[default: tune.minutes]")] = None,
    trials: Annotated[int | None, typer.Option(
        min=1, show_default=False,
        help="At most this many trials, counting those of an interrupted tune it "
        "continues \\[default: tune.trials]")] = None,
    write: Annotated[bool, typer.Option(
        "--write/--no-write", help="Write the best settings into the params file when "
        "they beat its own.")] = True,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Search the distillation settings (tune.space) for this data set, within a budget.

    An Optuna study (TPE, median pruning after each epoch) scores each trial by the distilled
    student's validation accuracy. The first trial is the params file's own settings; the
    best trial's settings are written back only if they beat it. One MLflow run, `tune`,
    holds a child run per trial; work_dir/tune/tune.json records every trial.
    """
    from kdpipe.config import DEFAULT_PARAMS_FILE
    from kdpipe.tuning.search import summary
    from kdpipe.tuning.search import tune as search
    from kdpipe.tuning.write_back import write_settings

    cfg = load_config(params, set_)
    budget = {"minutes": minutes, "trials": trials}
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(
        update={k: v for k, v in budget.items() if v is not None})})
    with work_dir_lock(cfg.work_dir, "kdpipe tune"):
        err.print(f"[bold]▶ tune[/] [dim]{len(cfg.tune.space)} settings, at most "
                  f"{cfg.tune.trials or 'unlimited'} trials in {cfg.tune.minutes:g} min[/]",
                  highlight=False)
        try:
            outcome = search(cfg, lambda line: err.print(f"  {escape(line)}", highlight=False))
        except KeyboardInterrupt:
            err.print("[dim]`kdpipe tune` again continues this search[/]", highlight=False)
            raise
    out.print(escape(summary(outcome.record)), highlight=False, soft_wrap=True)
    out.print(f"[dim]every trial: {outcome.path}[/]", highlight=False)
    if outcome.run_id:
        _print_mlflow_run(cfg, outcome.run_id)
    target = params if params is not None else DEFAULT_PARAMS_FILE
    if not outcome.improved:
        return
    if not write:
        command = _run_command(params, set_, outcome.best_settings)
        out.print(f"not written (--no-write); to use them: {escape(command)}",
                  highlight=False, soft_wrap=True)
        return
    changed = write_settings(target, outcome.best_settings)
    out.print(f"[green]{target}:[/] " + ("; ".join(changed) or "unchanged") +
              f" — `kdpipe run` re-runs {outcome.record['steps'][0]} and what follows",
              highlight=False,
              soft_wrap=True)


def _run_command(params: Path | None, given: list[str] | None, best: dict[str, Any]) -> str:
    """The `kdpipe run` that reproduces the best trial: the -S given to every trial, then the
    searched settings (a searched key given with -S too takes the trial's value). tune's own
    settings are left out: they do not change a run."""
    import shlex

    words = ["kdpipe", "run"] + (["--params", str(params)] if params is not None else [])
    for item in given or []:
        key = item.split("=", 1)[0].strip()
        if key not in best and key != "tune" and not key.startswith("tune."):
            words += ["-S", item]
    for key, value in best.items():
        words += ["-S", f"{key}={value}"]
    return shlex.join(words)


GATE_REFUSED = 2  # exit code of `kdpipe promote` when the gate says no: not an error


@app.command(
    help="Move the registry alias 'champion' to a version, through the promotion gate.\n\n"
    "The gate checks the registry.gate thresholds against the version's metrics, and its "
    "accuracy against the current champion's, both measured now on the same prepared rows.",
    epilog="Exit codes: 0 promoted (or already the champion); 2 the gate refused (the table "
    "says why); 1 an error (no such model or version, store unreachable, prepared data "
    "missing).")
@friendly_errors
def promote(
    version: Annotated[int | None, typer.Option(
        "--version", min=1, show_default=False,
        help="Version to promote (default: the one aliased 'challenger'); an older "
        "version rolls back.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Promote even if the gate refuses; the version is tagged "
        "kdpipe.forced_promotion=true with who and when.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Run the gate and show its table; move no alias, tag nothing. "
        "Exit code as if for real.")] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    from kdpipe.registry.gate import limit_text, unguarded, value_text
    from kdpipe.registry.promotion import promote as promote_version

    cfg = load_config(params, set_)
    warning = unguarded(cfg.registry.gate)
    if warning:
        err.print(f"[bold yellow]{warning}[/]", highlight=False, soft_wrap=True)
    result = promote_version(cfg, version=version, force=force, dry_run=dry_run)
    if result.decision is not None:
        table = Table(title=f"promotion gate: {result.name} v{result.version}")
        for column in ("check", "value", "limit", "result"):
            table.add_column(column, overflow="fold")
        for check in result.decision.checks:
            table.add_row(check.name, value_text(check.name, check.value),
                          limit_text(check.name, check.threshold),
                          ("[green]pass[/]" if check.passed else "[red]FAIL[/]") + (
                              f" {check.message}" if check.message and (
                                  not check.passed or check.value is None) else ""))
        out.print(table)
    colour = "green" if result.promoted else "yellow"
    out.print(f"[{colour}]{result.summary()}[/]", highlight=False, soft_wrap=True)
    if result.decision is not None and not result.decision.promote:
        raise typer.Exit(GATE_REFUSED)


@app.command()
@friendly_errors
def serve(
    model: Annotated[str | None, typer.Option(
        help="MLflow model URI (default: models:/<registry.model_name>@champion).",
        show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5001,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve a registered model over HTTP (MLflow's scoring server: POST /invocations with
    {"inputs": {"text": [...]}}), from any shell: no activated environment needed."""
    import os
    import sys

    from kdpipe.registry.store import open_registry
    from kdpipe.tracking import redact, tracking_uri

    cfg = load_config(params, set_)
    uri = model or f"models:/{cfg.registry.model_name}@champion"
    store = tracking_uri(cfg)
    if model is None and open_registry(cfg).alias(cfg.registry.model_name, "champion") is None:
        raise KdpipeError(f"registered model {cfg.registry.model_name!r} has no champion in "
                          f"{redact(store)}; run `kdpipe run` or `kdpipe promote` first")
    # `mlflow models serve` starts `uvicorn` from PATH: outside an activated environment
    # it is not found, so this environment's bin folder goes first.
    bin_dir = Path(sys.executable).parent
    mlflow_cli = bin_dir / "mlflow"
    if not mlflow_cli.is_file():
        raise KdpipeError(f"{mlflow_cli}: not found; is MLflow installed in this environment?")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    err.print(f"serving {uri} from {redact(store)} at http://{host}:{port}/invocations "
              "(Ctrl-C stops)", highlight=False, soft_wrap=True)
    os.execve(mlflow_cli, [str(mlflow_cli), "models", "serve", "-m", uri, "--env-manager",
                           "local", "-h", host, "-p", str(port)], env)


@app.command()
@friendly_errors
def compare(
    refs: Annotated[list[str], typer.Argument(
        help="Two or more registered versions: a number (3 or v3), an alias (champion, "
        "challenger) or the id of the MLflow run that registered it.",
        show_default=False)],
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Registered versions of registry.model_name side by side: key metrics, the gate's
    verdict, student, data and settings."""
    from kdpipe.registry.compare import resolve, rows
    from kdpipe.registry.store import open_registry

    cfg = load_config(params, set_)
    if len(refs) < 2:
        raise KdpipeError("compare needs two or more versions (e.g. `kdpipe compare champion "
                          "challenger`; `kdpipe models` lists them)")
    registry = open_registry(cfg)
    name = cfg.registry.model_name
    versions = [resolve(registry, name, ref) for ref in refs]
    table = Table(title=name, box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False,
                  title_justify="left")
    table.add_column("", no_wrap=True)
    for version in versions:
        table.add_column(f" v{version.version}", justify="right", no_wrap=True)
    for label, values in rows(versions):
        table.add_row(label, *(f" {value}" for value in values))
    out.print(table)
    out.print("* the most accurate. In MLflow, the pipeline runs carry the same numbers: "
              "select them, then Compare.", highlight=False)


@app.command()
@friendly_errors
def rollback(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Point 'champion' back at the previous champion (recorded at each promotion), without
    the gate; a second rollback undoes the first."""
    from kdpipe.registry.promotion import rollback as roll_back

    result = roll_back(load_config(params, set_))
    out.print(f"[green]{result.summary()}[/] ({result.name})", highlight=False,
              soft_wrap=True)


@app.command()
@friendly_errors
def models(
    version: Annotated[int | None, typer.Option(
        "--version", min=1, show_default=False,
        help="Show this version's gate checks (value, limit, result) too.")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """List the registered versions of registry.model_name: aliases, key metrics and the
    gate's verdict."""
    import datetime as dt

    from kdpipe.registry.promotion import list_models
    from kdpipe.tracking import redact, tracking_uri

    cfg = load_config(params, set_)
    versions = list_models(cfg)
    if version is not None:
        _print_gate_checks(cfg, next((v for v in versions if v.version == version), None),
                           version)
        return
    # Fits 80 columns: one space between columns, no side borders, headers that never wrap
    # (macro F1 and the gate's every check are in each version's model card).
    table = Table(title=f"{cfg.registry.model_name} in {redact(tracking_uri(cfg))}",
                  box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False, title_justify="left")
    for column in ("version", "aliases", "accuracy", "retention", "p50 ms", "MB"):
        table.add_column(column, no_wrap=True, justify="left" if column == "aliases"
                         else "right")
    table.add_column("gate", overflow="fold", min_width=6)
    table.add_column("created", no_wrap=True)
    for v in versions:
        m = v.metrics
        created = dt.datetime.fromtimestamp(v.created_ms / 1000).strftime("%Y-%m-%d")
        table.add_row(str(v.version), ",".join(v.aliases) or "–", _share(m.accuracy),
                      _share(m.retention), _number(m.latency_b1_p50_ms, "{:.3g}"),
                      _number(None if m.size_bytes is None else m.size_bytes / 1e6, "{:.2f}"),
                      _gate_state(v.tags), created)
    out.print(table)


def _print_gate_checks(cfg: Config, found: Any, number: int) -> None:
    """One version's gate checks, as the last promotion attempt recorded them."""
    import json

    from kdpipe.registry.gate import limit_text, value_text
    from kdpipe.registry.promotion import GATE_CHECKS

    name = cfg.registry.model_name
    if found is None:
        raise KdpipeError(f"registered model {name!r} has no version {number} "
                          "(`kdpipe models` lists them)")
    recorded = found.tags.get(GATE_CHECKS)
    if not recorded:
        out.print(f"{name} v{number}: the gate has not run on it (`kdpipe promote --version "
                  f"{number} --dry-run` runs it)", highlight=False)
        return
    table = Table(title=f"{name} v{number}: gate {found.tags.get('kdpipe.gate', '?')} "
                  f"({found.tags.get('kdpipe.gate_checked_at', 'unknown time')})",
                  box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False, title_justify="left")
    for column in ("check", " value", " limit", " result"):
        table.add_column(column, overflow="fold", no_wrap=column != " result")
    for check in json.loads(recorded):
        passed = check.get("passed")
        result = "pass" if passed else "FAIL"
        if check.get("message") and (not passed or check.get("value") is None):
            result += f": {check['message']}"
        table.add_row(check.get("name", "?"), f" {value_text(check['name'], check.get('value'))}",
                      f" {limit_text(check['name'], check.get('threshold'))}", f" {result}")
    out.print(table)


def _gate_state(tags: dict[str, str]) -> str:
    """``passed``, or ``refused`` with the failed checks' names, from the version's tags."""
    state = tags.get("kdpipe.gate", "–")
    failed = tags.get("kdpipe.gate_failed", "-")
    return f"{state}: {failed.replace(',', ', ')}" if state == "refused" and failed != "-" \
        else state


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.2%}"


def _number(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


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


def _paragraphs_unwrapped(text: str) -> str:
    """Typer's rich help keeps a docstring's line breaks, so a terminal narrower than the
    source wraps each line again and leaves ragged stubs; with each paragraph on one line,
    rich wraps it to the terminal's width."""
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


for _command in app.registered_commands:
    _command.help = _paragraphs_unwrapped(_command.help or inspect.getdoc(_command.callback)
                                          or "") or None


if __name__ == "__main__":
    app()
