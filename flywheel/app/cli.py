"""`flywheel ...`: the command line. Loads the settings once, then calls the library or a Prefect flow."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flywheel.config import Settings, load_settings
from flywheel.errors import FlywheelError
from flywheel.health import require_healthy

if TYPE_CHECKING:  # the loop imports torch: only the commands that run it load it
    import numpy as np
    import numpy.typing as npt
    from mlflow import MlflowClient

    from flywheel.catalog import Quarantine
    from flywheel.loop import FinetuneReport
    from flywheel.simulation.datasets import Dataset

# MLflow's console chatter: a run link after every run (the round report carries it) and a progress bar per
# artifact download. MLflow reads both when it prints; a user's own setting wins.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

app = typer.Typer(
    help="Active-learning data flywheel: label less, learn more, trace every model.", no_args_is_help=True
)
services_app = typer.Typer(help="Start, stop and check the local Label Studio, MLflow and Prefect servers.")
app.add_typer(services_app, name="services")
db_app = typer.Typer(help="The catalog's database schema (alembic migrations in flywheel/catalog/migrations).")
app.add_typer(db_app, name="db")
quarantine_app = typer.Typer(help="The files kept out of the pool, and letting one back.")
app.add_typer(quarantine_app, name="quarantine")
console = Console()


def _friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Our own errors print as one clear line (exit 1), not a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FlywheelError as exc:
            console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from exc

    return wrapper


def _settings() -> Settings:
    return load_settings()


def _use_prefect_server(settings: Settings, *, label_studio: bool = False, mlflow: bool = False) -> None:
    """Flows report to the Prefect server from the settings. It, and the servers the flow needs, are checked
    here first: a server that is down or a refused token is one line, at once (inside a flow, Prefect would
    log the same failure with its traceback)."""
    url = settings.prefect.api_url
    require_healthy("Prefect", url)
    if label_studio:
        from flywheel import labelstudio

        labelstudio.connect(settings)
    if mlflow:
        from flywheel.registry import tracking

        tracking.connect(settings)
    os.environ["PREFECT_API_URL"] = url
    from flows.console import quiet_console

    log_file = quiet_console(settings.dirs.logs / "flows.log")
    console.print(f"[dim]each step's full log: the Prefect UI ({url.removesuffix('/api')}) and {log_file}[/]")


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


@services_app.command("start")
@_friendly
def services_start() -> None:
    """Start (or reuse) the three servers, and the deployments' worker when this workspace has deployments."""
    from flywheel.devservers import services

    settings = _settings()
    for name, url in services.start(settings).items():
        console.print(f"{name:13s} {url}")
    if services.deployed_marker(settings).exists():
        from flows.worker import start_worker

        console.print(f"worker        pid {start_worker(settings)}")


@services_app.command("stop")
@_friendly
def services_stop() -> None:
    from flywheel.devservers import services

    console.print(f"stopped: {', '.join(services.stop(_settings())) or 'nothing'}")


@services_app.command("status")
@_friendly
def services_status() -> None:
    from flywheel.devservers import services

    settings = _settings()
    for name, healthy in services.health(settings).items():
        console.print(f"{name:13s} {'[green]healthy[/]' if healthy else '[red]down[/]'}")
    worker = services.worker_state(settings)
    if worker is not None:
        console.print(worker, highlight=False)


@db_app.command("upgrade")
@_friendly
def db_upgrade() -> None:
    """Bring the catalog (settings.catalog_url) to the newest schema revision; opening a catalog also does."""
    from sqlalchemy import inspect

    from flywheel.catalog import engine_for, migrations

    engine = engine_for(_settings().catalog_url)
    with engine.connect() as conn:
        before = migrations.current(conn) or (
            "none: made before alembic" if inspect(conn).has_table("samples") else "empty"
        )
    where = engine.url.render_as_string(hide_password=True)
    if migrations.upgrade(engine):
        console.print(
            f"catalog {where}: upgraded from ({before}) to {migrations.head()}", highlight=False, soft_wrap=True
        )
    else:
        console.print(f"catalog {where}: already at {before}", highlight=False, soft_wrap=True)
    engine.dispose()


@app.command("import")
@_friendly
def import_(
    source: Annotated[str, typer.Argument(help="ImageFolder tree, .csv/.jsonl manifest, or 'fashion-mnist'")],
    split: Annotated[str, typer.Option(help="pool (to label) or test (evaluation only)")] = "pool",
    trust_labels: Annotated[bool, typer.Option(help="record the source's labels as labels")] = False,
    pool_size: Annotated[int, typer.Option(help="fashion-mnist: pool images")] = 5000,
    test_size: Annotated[int, typer.Option(help="fashion-mnist: test images")] = 10000,
) -> None:
    """Add samples to the catalog (content-hashed; already-known files are skipped)."""
    from flywheel.catalog import POOL, TEST, Catalog
    from flywheel.errors import ConfigError
    from flywheel.sources import quarantine
    from flywheel.sources.importing import import_source

    if split not in (POOL, TEST):
        raise ConfigError(f"--split must be one of: {POOL}, {TEST}; got {split!r}")
    settings = _settings()
    catalog = Catalog(settings.catalog_url)
    already_held = {row.id for row in catalog.quarantined()}
    results = import_source(
        catalog,
        settings,
        source,
        split=split,
        trust_labels=trust_labels,
        pool_size=pool_size,
        test_size=test_size,
    )
    for name, result in results.items():
        console.print(
            f"{name}: {result.added} added, {result.skipped} already known, {result.labelled} labelled, "
            f"{result.quarantined} kept out"
        )
    report = quarantine.write_report(settings, catalog).report  # the new rows are in the report from now on
    _print_quarantined([row for row in catalog.quarantined() if row.id not in already_held], report)
    classes = catalog.classes()
    console.print(f"classes ({len(classes)}): {', '.join(classes)}", highlight=False)
    if len(classes) < 2:
        console.print(
            "[yellow]warning:[/] a classifier needs at least 2 classes; rounds train no model until the project "
            "has another (import images of one, or name the classes with FLYWHEEL_CLASSES)",
            highlight=False,
        )


@app.command()
@_friendly
def export(
    out: Annotated[Path, typer.Argument(help="folder to write into (created)")],
    format_: Annotated[
        str, typer.Option("--format", help="imagefolder, csv, jsonl, coco or hf (Hugging Face datasets)")
    ] = "imagefolder",
    only_reviewed: Annotated[bool, typer.Option(help="only labels a reviewer confirmed or corrected")] = False,
    min_agreement: Annotated[
        float | None, typer.Option(help="only labels of 2+ annotators with at least this share of the votes")
    ] = None,
) -> None:
    """Write the catalog's labels, with split, annotators, agreement and provenance columns."""
    from flywheel.catalog import Catalog
    from flywheel.insight.export import FORMATS, label_rows, write_export

    if format_ not in FORMATS:
        raise typer.BadParameter(f"choose one of {', '.join(FORMATS)}", param_hint="--format")
    settings = _settings()
    catalog = Catalog(settings.catalog_url)
    mode = settings.label_studio.label_mode
    rows = label_rows(catalog, mode=mode, only_reviewed=only_reviewed, min_agreement=min_agreement)
    written = write_export(rows, out, format_)
    console.print(f"exported {len(rows)} labels as {format_}: {written}", highlight=False)


def _print_quarantined(rows: Sequence[Quarantine], report: Path | str, *, shown: int = 10) -> None:
    """Files kept out of the pool, by reason, the first `shown` by name, and the report that lists them all."""
    if not rows:
        return
    reasons = Counter(row.reason for row in rows)
    console.print(
        f"kept out of the pool: {len(rows)} files ({', '.join(f'{r}: {n}' for r, n in reasons.most_common())}); "
        f"every one with its reason in {report}",
        highlight=False,
    )
    for row in rows[:shown]:
        console.print(f"  {row.uri}: {row.reason}" + (f" ({row.detail})" if row.detail else ""), highlight=False)
    if 0 < shown < len(rows):
        console.print(f"  ... and {len(rows) - shown} more", highlight=False)


@app.command()
@_friendly
def bootstrap(
    source: Annotated[
        str | None, typer.Option(help="import this first (as `flywheel import` does); default: nothing")
    ] = None,
    pool_size: Annotated[int, typer.Option(help="--source fashion-mnist: pool images")] = 5000,
    test_size: Annotated[int, typer.Option(help="--source fashion-mnist: test images")] = 10000,
) -> None:
    """Embed the catalog's images with the frozen backbone, build the FAISS index, create the Label Studio
    project."""
    settings = _settings()
    _use_prefect_server(settings, label_studio=True)
    from flows.flywheel_flows import bootstrap_flow

    report = bootstrap_flow(source=source, pool_size=pool_size, test_size=test_size)
    imported = ", ".join(f"{split}: {r['added']} added" for split, r in report["imported"].items()) or "nothing"
    console.print(
        f"imported {imported}; embedded {report['n_pool']} pool + {report['n_test']} test images "
        f"({report['embedding_dim']}-d); index {report['index_path']}; Label Studio project {report['project_id']} "
        f"({settings.label_studio.url}/projects/{report['project_id']})",
        highlight=False,
        soft_wrap=True,
    )


@app.command("round")
@_friendly
def round_() -> None:
    """Train the head on the labels so far, register it, select the next batch, push it to Label Studio."""
    settings = _settings()
    _use_prefect_server(settings, label_studio=True, mlflow=True)
    from flows.flywheel_flows import round_flow

    report = round_flow()
    picked = (
        f"selected {len(report.selected)} by {report.strategy}"
        if report.selected
        else f"selected nothing ({report.description or 'selection off'})"
    )
    console.print(
        f"round {report.round_id}: {report.n_labels} labels, test {_pct(report.test_accuracy)}, {picked}, "
        f"model version {report.model_version or '-'}"
        + (f", head on {report.features} features" if report.features != "last" else "")
        + (f"\n{report.model_note}" if report.model_note else ""),
        highlight=False,
    )


@app.command()
@_friendly
def sync(finetune: Annotated[bool, typer.Option(help="run the fine-tune when the threshold is met")] = True) -> None:
    """Pull new annotations from Label Studio into the catalog (idempotent)."""
    settings = _settings()
    _use_prefect_server(settings, label_studio=True)
    from flows.flywheel_flows import sync_flow

    result = sync_flow(finetune_when_due=finetune)
    console.print(f"sync: {result['summary']}; {result['n_labels']} labels", highlight=False, soft_wrap=True)
    console.print(f"fine-tune: {result['finetune_step']}", highlight=False)
    if result["finetune"] is not None:
        _print_finetune(result["finetune"])


@app.command("finetune")
@_friendly
def finetune_() -> None:
    """Fine-tune deeper now (normally started by sync when enough labels have accumulated)."""
    settings = _settings()
    _use_prefect_server(settings, mlflow=True)
    from flows.flywheel_flows import finetune_flow

    _print_finetune(finetune_flow())


def _print_finetune(report: FinetuneReport | str) -> None:
    if isinstance(report, str):  # refused: these labels already had a fine-tune
        console.print(f"fine-tune not run: {report}", highlight=False, soft_wrap=True)
        return
    console.print(
        f"fine-tune: version {report.model_version} ({report.backbone}, depth {report.depth}), held-out "
        f"{_pct(report.holdout_accuracy)}, test {_pct(report.test_accuracy)}: "
        f"{'promoted' if report.promoted else 'not promoted'}, {report.promotion_reason}"
        + (f"\nbackbone: {report.backbone_choice}" if report.backbone_choice else ""),
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@_friendly
def promote(
    version: Annotated[str, typer.Option("--version", help="registered model version to make champion")],
) -> None:
    """Move the champion alias to a version by hand (roll back or forward), re-embed the pool if needed and
    show open Label Studio tasks its predictions."""
    from flywheel import labelstudio, loop
    from flywheel.catalog import Catalog
    from flywheel.registry import tracking

    settings = _settings()
    catalog, mlflow_client = Catalog(settings.catalog_url), tracking.connect(settings)
    body = loop.promote(settings, catalog, mlflow_client, version)
    console.print(f"champion: version {version} of {settings.registered_model_name}; pool embedded by body {body}")
    # after the promotion, so a Label Studio that is down cannot block a roll-back; rerunning is safe
    refreshed = loop.refresh_open_tasks(settings, catalog, labelstudio.connect(settings), mlflow_client, version)
    console.print(f"open Label Studio tasks now showing version {version}'s predictions: {refreshed} changed")


@app.command()
@_friendly
def webhook(
    unregister: Annotated[
        bool, typer.Option("--unregister", help="only remove the project's webhooks to this receiver's URL")
    ] = False,
) -> None:
    """Receive Label Studio's annotation webhooks (needs FLYWHEEL_WEBHOOK__SECRET): registers its webhook on the
    project while it runs and removes it when stopped."""
    from flywheel.app import webhook as receiver

    settings = _settings()
    if unregister:
        removed = receiver.unregister(settings)
        console.print(f"removed {removed} webhook(s) to {settings.webhook.endpoint}", highlight=False)
        return
    console.print(f"starting the webhook receiver for {settings.webhook.endpoint}", highlight=False)
    receiver.serve(settings)


@app.command()
@_friendly
def serve() -> None:
    """Serve the champion over HTTP (serve.host:serve.port): POST /predict with an image, or JSON {"images": [...]}
    of URLs or base64; answers class probabilities and the model version, and follows the champion alias."""
    from flywheel.app import serve as server

    settings = _settings()
    console.print(f"serving the champion of {settings.registered_model_name} on {settings.serve.url}", highlight=False)
    server.serve(settings)


@quarantine_app.command("list")
@_friendly
def quarantine_list(reason: Annotated[str | None, typer.Option(help="only this reason")] = None) -> None:
    """Every file kept out of the pool, one a line: id, stage, reason, the whole path, the detail."""
    from flywheel.catalog import Catalog

    rows = [r for r in Catalog(_settings().catalog_url).quarantined() if reason is None or r.reason == reason]
    console.print(f"quarantine: {len(rows)} files (release one with `flywheel quarantine release ID`)")
    for row in rows:
        console.print(
            f"{row.id:>6} {row.stage:6} {row.reason:22} {row.uri}  ({row.detail})", highlight=False, soft_wrap=True
        )


@quarantine_app.command("release")
@_friendly
def quarantine_release(ids: Annotated[list[int], typer.Argument(help="quarantine ids (`quarantine list`)")]) -> None:
    """Let files back: a sample returns to the pool, a file refused at import is tried at the next import."""
    from flywheel.catalog import Catalog

    catalog = Catalog(_settings().catalog_url)
    for quarantine_id in ids:
        row = catalog.release(quarantine_id)
        back = "back in the pool" if row.sample_id is not None else "tried again at the next import"
        console.print(f"released {quarantine_id} ({row.reason}): {row.uri} is {back}", highlight=False, soft_wrap=True)


@app.command("annotate-sim")
@_friendly
def annotate_sim(
    noise_rate: Annotated[float, typer.Option(help="share of deliberately wrong answers")] = 0.0,
    limit: Annotated[int | None, typer.Option(help="answer at most this many tasks")] = None,
) -> None:
    """Answer open Label Studio tasks from ground truth, through the Label Studio API."""
    settings = _settings()
    _use_prefect_server(settings, label_studio=True)
    from flows.flywheel_flows import annotate_sim_flow

    console.print(f"annotated {annotate_sim_flow(noise_rate=noise_rate, limit=limit)} tasks")


@app.command()
@_friendly
def demo(
    rounds: Annotated[int, typer.Option(help="annotation rounds")] = 6,
    pool_size: int = 5000,
    test_size: int = 10000,
    noise_rate: float = 0.0,
    out: Annotated[str | None, typer.Option(help="also write the summary as JSON here")] = None,
) -> None:
    """The whole loop on Fashion-MNIST with the simulated annotator, on the local servers."""
    from flywheel.devservers import services

    settings = _settings()
    services.start(settings)
    _use_prefect_server(settings, label_studio=True, mlflow=True)
    from flows.flywheel_flows import demo_flow

    began = time.monotonic()
    summary = demo_flow(rounds=rounds, pool_size=pool_size, test_size=test_size, noise_rate=noise_rate)
    summary["seconds"] = round(time.monotonic() - began, 1)
    if summary["reused"]:
        console.print(
            f"[yellow]this workspace's demo already ran[/] ({settings.workspace}): its results, from the catalog; "
            "nothing was labelled or trained now (`make clean` for a fresh demo)",
            highlight=False,
        )
    table = Table(title="flywheel demo: Fashion-MNIST, simulated annotator")
    for column in ("round", "labels", "strategy", "selected", "model version", "test accuracy", "champion?"):
        table.add_column(column)
    for row in summary["rounds"]:
        table.add_row(
            str(row["round"]),
            str(row["labels"]),
            row["strategy"] if row["selected"] else "-",
            str(row["selected"]),
            str(row["model_version"] or "-"),
            _pct(row["test_accuracy"]),
            "yes" if row["promoted"] else "no",
        )
    console.print(table)
    for f in summary["finetunes"]:
        console.print(
            f"fine-tune v{f['model_version']} ({f['depth']}): held-out {_pct(f['holdout_accuracy'])}, "
            f"test {_pct(f['test_accuracy'])}, {'promoted' if f['promoted'] else 'kept as challenger'}: {f['reason']}"
        )
    champion_rounds = [r for r in summary["rounds"] if r["model_version"] == summary["champion"]]
    champion_test = f" (test {_pct(champion_rounds[0]['test_accuracy'])})" if champion_rounds else ""
    console.print(
        f"labels used: [bold]{summary['labels']}[/], final test accuracy "
        f"[bold]{_pct(summary['rounds'][-1]['test_accuracy'])}[/], champion: version [bold]{summary['champion']}[/]"
        f"{champion_test} of {settings.registered_model_name}, time {summary['seconds']:.0f} s"
    )
    for name, url in services.urls(settings).items():
        console.print(f"{name:13s} {url}")
    console.print("the servers keep running; `make stop` ends them")
    if out:
        with open(out, "w") as fh:
            json.dump(summary, fh, indent=2, default=str)


@app.command()
@_friendly
def simulate(
    data: Annotated[
        str, typer.Option(help="ImageFolder tree, or built-in: fashion-mnist, digits, fashion-mnist-imbalanced")
    ] = "fashion-mnist",
    pool_size: Annotated[int, typer.Option(help="fashion-mnist: images drawn from its training set")] = 5000,
    strategies: Annotated[
        str | None, typer.Option(help="comma-separated strategy names [random,entropy,auto; --loop: auto]")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="repetitions (split, initial labels, strategy RNG)")] = 3,
    initial_per_class: Annotated[int, typer.Option(min=1, help="labels per class before the first round")] = 2,
    budget_per_class: Annotated[int, typer.Option(min=1, help="stop at classes x this many labels")] = 20,
    batch_size: Annotated[int | None, typer.Option(min=1, help="labels added per round [number of classes]")] = None,
    backbone: Annotated[str | None, typer.Option(help="embedding backbone [settings.backbone]")] = None,
    out: Annotated[str | None, typer.Option(help="write the JSON report here")] = None,
    plot: Annotated[str | None, typer.Option(help="write the learning curves (PNG) here")] = None,
    mlflow: Annotated[bool, typer.Option(help="log one MLflow run per strategy")] = True,
    loop: Annotated[
        bool,
        typer.Option("--loop", help="the whole mixed approach (far-domain heads, fine-tunes, guard) vs heads only"),
    ] = False,
) -> None:
    """Active learning with an oracle on labelled images: learning curves per strategy, mean over seeds.

    With --loop, one strategy and two configurations: `heads-only` (a last-stage head every round) and `loop`
    (the champion as the flywheel keeps it, fine-tunes at the settings' thresholds included)."""
    from flywheel.registry import tracking
    from flywheel.simulation import datasets

    settings = load_settings(backbone=backbone) if backbone else _settings()
    plan = _simulation_plan(
        strategies or ("auto" if loop else "random,entropy,auto"),
        seeds=seeds,
        initial_per_class=initial_per_class,
        budget_per_class=budget_per_class,
        batch_size=batch_size,
    )
    if loop and len(plan.strategies) != 1:
        raise FlywheelError(f"--loop replays one strategy; --strategies names {len(plan.strategies)}")
    client = tracking.connect(settings) if mlflow else None  # a down server fails before the work too
    began = time.monotonic()
    dataset = datasets.load_dataset(data, settings, pool_size=pool_size)
    if loop:
        report = _simulate_loop_with_progress(dataset, plan, settings)
    else:
        dataset = datasets.embed_dataset(dataset, settings)
        assert dataset.features is not None  # embed_dataset fills them
        console.print(
            f"{dataset.name}: {len(dataset.paths)} images, {len(dataset.classes)} classes, "
            f"{settings.backbone} {settings.image_size}px features {dataset.features.shape[1]}-d "
            f"({time.monotonic() - began:.0f} s)"
        )
        report = _simulate_with_progress(dataset, dataset.features, plan, l2=settings.head_l2)
    report["backbone"] = settings.backbone
    report["image_size"] = settings.image_size
    report["seconds"] = round(time.monotonic() - began, 1)
    _print_curves(report)
    _print_finetunes(report)
    _publish_simulation(report, plot=plot, out=out, client=client, backbone=settings.backbone)


@dataclass(frozen=True)
class SimulationPlan:
    """What `flywheel simulate` runs on the embedded images: the strategies and the labelling schedule."""

    strategies: list[str]
    seeds: int
    initial_per_class: int
    budget_per_class: int
    batch_size: int | None  # None: one label per class and round

    def evaluations(self, n_classes: int) -> int:
        """Test evaluations the run makes (seeds x strategies x budgets): the progress bar's total."""
        start, stop = n_classes * self.initial_per_class, n_classes * self.budget_per_class
        rounds = len(range(start, stop, self.batch_size or n_classes)) + 1
        return self.seeds * len(self.strategies) * rounds


def _simulation_plan(
    strategies: str, *, seeds: int, initial_per_class: int, budget_per_class: int, batch_size: int | None
) -> SimulationPlan:
    """The plan from the command's options; a bad strategy name fails here, before any embedding work."""
    from flywheel.simulation import resolve_strategies

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    resolve_strategies(names)
    return SimulationPlan(
        strategies=names,
        seeds=seeds,
        initial_per_class=initial_per_class,
        budget_per_class=budget_per_class,
        batch_size=batch_size,
    )


def _simulate_with_progress(
    dataset: Dataset, features: npt.NDArray[np.float32], plan: SimulationPlan, *, l2: float
) -> dict[str, Any]:
    """Run the plan on the embedded dataset, with a progress bar advancing at each test evaluation."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flywheel.simulation import simulate as run_simulation

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("simulating", total=plan.evaluations(len(dataset.classes)))

        def step(name: str, seed: int, budget: int) -> None:
            progress.update(task, advance=1, description=f"seed {seed} {name}: {budget} labels")

        return run_simulation(
            features,
            dataset.targets,
            dataset.classes,
            strategies=plan.strategies,
            seeds=plan.seeds,
            initial_per_class=plan.initial_per_class,
            budget_per_class=plan.budget_per_class,
            batch_size=plan.batch_size,
            l2=l2,
            dataset=dataset.name,
            on_step=step,
        )


def _simulate_loop_with_progress(dataset: Dataset, plan: SimulationPlan, settings: Settings) -> dict[str, Any]:
    """`simulation.mixed.simulate_loop` on the dataset with the project's fine-tune settings, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flywheel.simulation.mixed import LoopPlan, simulate_loop

    loop_plan = LoopPlan(
        strategy=plan.strategies[0], backbone=settings.backbone, image_size=settings.image_size,
        finetune=settings.finetune, holdout_fraction=settings.holdout_fraction, l2=settings.head_l2,
        promotion_margin=settings.promotion_margin, seeds=plan.seeds, initial_per_class=plan.initial_per_class,
        budget_per_class=plan.budget_per_class, batch_size=plan.batch_size,
    )  # fmt: skip
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("simulating", total=2 * plan.evaluations(len(dataset.classes)))

        def step(name: str, seed: int, budget: int) -> None:
            progress.update(task, advance=1, description=f"seed {seed} {name}: {budget} labels")

        return simulate_loop(
            dataset.paths, dataset.targets, dataset.classes, loop_plan, dataset=dataset.name,
            device=settings.finetune.device if settings.finetune.device != "auto" else "cpu", on_step=step,
        )  # fmt: skip


def _print_finetunes(report: Mapping[str, Any]) -> None:
    """The fine-tunes a --loop run made: when, how deep, and what the guard decided."""
    for f in report.get("finetunes", []):
        verdict = "promoted" if f["promoted"] else "kept out"
        accuracy = f", test {_pct(f['test_accuracy'])}" if "test_accuracy" in f else ""
        console.print(f"seed {f['seed']}: fine-tune at {f['labels']} labels, {f['depth']}{accuracy}: {verdict}")


def _print_curves(report: Mapping[str, Any]) -> None:
    """One table row per strategy: the report's summary of its learning curve."""
    table = Table(title=f"flywheel simulate: {report['dataset']} (all labels: {_pct(report['full_label_accuracy'])})")
    for column in ("strategy", "AULC", "balanced AULC", "final accuracy", "labels to 95% of all-label"):
        table.add_column(column)
    for name, curve in report["strategies"].items():
        reached = curve["labels_to_95pct_of_full"]
        table.add_row(
            name,
            _pct(curve["aulc"]),
            _pct(curve["balanced_aulc"]),
            _pct(curve["accuracy_mean"][-1]),
            "-" if reached is None else str(reached),
        )
    console.print(table)


def _publish_simulation(
    report: Mapping[str, Any], *, plot: str | None, out: str | None, client: MlflowClient | None, backbone: str
) -> None:
    """Write the plot and the JSON report where asked, and log the runs to MLflow when connected."""
    from flywheel.simulation import publish

    figure = publish.plot_curves(report)
    if plot:
        publish.save_plot(figure, Path(plot))
        console.print(f"plot: {plot}")
    if out:
        publish.write_report(report, Path(out))
        console.print(f"report: {out}")
    if client is not None:
        runs = publish.log_runs(client, report, figure, backbone=backbone)
        console.print(f"MLflow: {len(runs)} runs in experiment {publish.experiment_name(report['dataset'])}")


@app.command()
@_friendly
def status() -> None:
    """Samples, labels, rounds and the champion, from the catalog."""
    from flywheel.catalog import POOL, TEST, Catalog
    from flywheel.sources import quarantine

    settings = _settings()
    catalog = Catalog(settings.catalog_url)
    console.print(
        f"project {settings.project}: {catalog.count_samples(POOL)} pool / {catalog.count_samples(TEST)} test "
        f"samples, {catalog.count_labels()} labels, {len(catalog.sent_sample_ids())} sent to Label Studio"
    )
    table = Table(title="rounds")
    for column in ("round", "labels", "strategy", "selected", "model version", "held-out", "test"):
        table.add_column(column)
    for r in catalog.rounds():
        table.add_row(
            str(r.id),
            str(r.n_labels),
            r.strategy,
            str(r.n_selected),
            str(r.model_version or "-"),
            _pct(r.holdout_accuracy),
            _pct(r.test_accuracy),
        )
    console.print(table)
    _print_quarantined(catalog.quarantined(), quarantine.report_path(settings), shown=0)  # status writes nothing
    console.print(_champion_line(settings), highlight=False)
    from flywheel.devservers import services

    worker = services.worker_state(settings)
    if worker is not None:
        console.print(worker, highlight=False)
    from flywheel.insight import after_round, forecast, review

    latest = after_round.latest_forecast(catalog)
    waiting = f"none yet (needs {forecast.MIN_POINTS} rounds with a model)"
    lines = forecast.summary_lines(latest[1]) if latest else [waiting]
    console.print(f"forecast{f' (round {latest[0]})' if latest else ''}:\n  " + "\n  ".join(lines), highlight=False)
    counts = review.review_counts(catalog)
    console.print(
        f"label review: {counts.total} flagged labels sent, {counts.corrected} corrected, "
        f"{counts.confirmed} confirmed, {counts.open} open"
    )


def _champion_line(settings: Settings) -> str:
    """The champion as MLflow holds it: version, kind, and its held-out and test accuracy when logged."""
    from flywheel.errors import ServiceUnavailableError
    from flywheel.registry import tracking

    try:
        client = tracking.connect(settings)
    except ServiceUnavailableError as exc:
        return f"champion: unknown ({exc})"
    version = tracking.champion_version(client, settings)
    if version is None:
        return f"champion: none yet in {settings.registered_model_name} ({settings.mlflow.url})"
    model = tracking.model_version(client, settings, version)
    metrics = client.get_run(model.run_id).data.metrics if model.run_id else {}
    return (
        f"champion: version {version} of {settings.registered_model_name} ({model.tags.get('kind', '?')}, "
        f"held-out {_pct(metrics.get('holdout_accuracy'))}, test {_pct(metrics.get('test_accuracy'))})"
    )


@app.command()
@_friendly
def explain(sample_id: Annotated[int, typer.Argument(help="catalog sample id")]) -> None:
    """Where a sample's label came from: the round, strategy, model, score and rank that asked for it, who
    answered and how fast, and its review."""
    from flywheel.catalog import Catalog
    from flywheel.errors import DataError
    from flywheel.insight.provenance import provenance_of

    settings = _settings()
    catalog = Catalog(settings.catalog_url)
    record = provenance_of(catalog, [sample_id]).get(sample_id)
    if record is None:
        raise DataError(f"sample {sample_id} is not in the catalog {settings.catalog_url}")
    role = "held out (judges models)" if record.fold < round(100 * settings.holdout_fraction) else "training"
    seconds = "{:.1f} s".format
    rows = [
        ("sample", f"{record.sample_id}: {record.uri}"),
        ("content hash", record.content_hash),
        ("split / fold", f"{record.split} / {record.fold}: {role}"),
        ("label", f"{record.label} ({record.label_origin})" if record.label else "none yet"),
        ("round", str(record.round_id or "-")),
        ("strategy", record.strategy or "-"),
        *((f"  {key}", str(value)) for key, value in record.params.items()),
        ("scored by model version", record.model_version or "none (cold start)"),
        ("score / rank", f"{record.score:.4g} / {record.rank} of {record.params.get('k_per_round', '?')}"
         if record.score is not None and record.rank is not None else "-"),
        ("selected at", str(record.selected_at or "-")),
        ("Label Studio task", str(record.ls_task_id or "-")),
        ("annotators", ", ".join(record.annotators) or "-"),
        *((f"  annotation {a['annotation_id']}", f"{a['annotator']}: {', '.join(a['choices']) or '-'} ({a['state']})"
           + (f" at {a['created_at']}" if a["created_at"] else "")
           + (f", lead time {seconds(a['lead_time_s'])}" if a["lead_time_s"] is not None else ""))
          for a in record.annotations),
        *(("  tie", f"{label}: annotations {', '.join(map(str, ids))}") for label, ids in (record.tie or {}).items()),
        ("label history", f"{len(record.history)} change(s)" if record.history else "-"),
        *((f"  {h['at']:%Y-%m-%d %H:%M:%S}", f"{h['reason']}: {h['previous'] or '-'} -> {h['label'] or '-'}")
          for h in record.history),
        ("time to label", seconds(record.time_to_label_s) + " from sending the task to its first standing answer"
         if record.time_to_label_s is not None else "-"),
        ("lead time", seconds(record.lead_time_s) if record.lead_time_s is not None else "not recorded"),
    ]  # fmt: skip
    if record.review:
        r = record.review
        rows += [
            ("review", f"{r['status']}: {r['label_before']} -> {r['label_after'] or '?'} (suggested {r['suggested']})"),
            *(("  flagged", reason) for reason in r["reasons"]),
        ]
    table = Table(title=f"sample {sample_id}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


if __name__ == "__main__":
    app()
