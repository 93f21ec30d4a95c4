"""The `sdfarm` command: presentation only, every operation is the farm's (producer/farm.py). `worker`,
`make-tiny-model` and `reproduce` exec `sdfarm-worker` (worker/cli.py), so the producer never imports
torch or the worker package."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from sdfarm.batchfile import load_yaml
from sdfarm.command import EXIT_FAILED, load_settings, run_command
from sdfarm.datasets import load_spec
from sdfarm.errors import BatchInvalid, brief, printable
from sdfarm.models import FAMILY_FREE
from sdfarm.progress import ACTIVE, CANCELLED
from sdfarm.queue import DEFAULT_PRIORITY

from .export import FORMATS as EXPORT_FORMATS
from .exporter import serve as serve_metrics
from .farm import RECONCILE_AFTER_S, Farm
from .fetch import contact_sheet
from .scheduler import run_scheduler
from .watch import status_table, workers_table

console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True)


def _farm() -> Farm:
    return Farm.from_settings(load_settings())


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{brief(pair)}: expected FIELD=VALUE", param_hint="--set")
        try:
            out[key.strip()] = load_yaml(value, "--set") if value else ""
        except BatchInvalid as e:
            raise click.BadParameter(f"{brief(pair)}: {e.problems[0].message} (the value is read as YAML: put"
                                     " text in quotes, e.g. --set 'prompt=\"[a] b\"')", param_hint="--set") from None
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """sdfarm: distributed batch rendering for Stable Diffusion."""


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; enqueue nothing.")
@click.option("--priority", type=click.IntRange(0, 9), default=DEFAULT_PRIORITY, show_default=True,
              help="0 lowest .. 9 highest.")
@click.option("--model", help="Default model for items that name none.")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="A default for every item (repeatable).")
@click.option("--name", help="Batch name (default: the file's name field, else its stem).")
@click.option("--watch", "then_watch", is_flag=True, help="Watch the batch after submitting.")
@click.option("--cpu-noise", is_flag=True,
              help="A1111 images in: render images whose noise A1111 drew on the GPU with CPU noise.")
def submit(file: Path, dry_run: bool, priority: int, model: str | None, sets: tuple[str, ...], name: str | None,
           then_watch: bool, cpu_noise: bool) -> None:
    """Validate FILE (yaml, json, jsonl, csv, txt; or A1111 images: a .png or a folder of them, one job
    per image from its infotext) and enqueue its jobs. All or nothing."""
    farm = _farm()
    overrides = _parse_sets(sets)
    if model:
        overrides["model"] = model
    stream = farm.plan_file(file, overrides, name, cpu_noise)
    if dry_run:
        console.print(farm.describe(stream), highlight=False)
        console.print("dry run: nothing enqueued")
        return
    result = farm.submit(stream, priority)
    console.print(f"batch {result.batch_id}: {result.jobs} jobs, {result.chunks_enqueued} chunks enqueued,"
                  f" {result.already_done} already done", highlight=False)
    state = farm.state(result.batch_id)
    if state != ACTIVE:
        errors.print(f"batch {result.batch_id} is {state}: `sdfarm resume` to render it")
    if then_watch:
        _watch_and_exit(farm, result.batch_id, None)


def _watch_and_exit(farm: Farm, batch_id: str, timeout: float | None,
                    reconcile_after: float | None = RECONCILE_AFTER_S) -> None:
    p = farm.watch(batch_id, console, timeout, reconcile_after, notices=errors)
    if p.state == CANCELLED:
        errors.print(f"batch {batch_id}: cancelled ({p.done} of {p.total} done)")
        sys.exit(EXIT_FAILED)
    if not p.finished:
        errors.print(f"batch {batch_id}: not finished after {timeout}s ({p.queued} queued)")
        sys.exit(EXIT_FAILED)
    if p.failed:
        errors.print(f"batch {batch_id}: {p.failed} of {p.total} jobs failed (see `sdfarm fetch`)")
        sys.exit(EXIT_FAILED)
    console.print(f"batch {batch_id}: all {p.total} jobs done")


@cli.command("watch")
@click.argument("batch_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit 1).")
@click.option("--reconcile-after", type=float, default=RECONCILE_AFTER_S, show_default=True,
              help="Seconds without progress (queue empty) before missing jobs are re-enqueued.")
def watch_cmd(batch_id: str, timeout: float | None, reconcile_after: float) -> None:
    """Live progress of a batch. Exit 0 when every job is done, 1 when any failed or it was cancelled."""
    _watch_and_exit(_farm(), batch_id, timeout, reconcile_after)


@cli.command("cancel")
@click.argument("batch_id")
def cancel_cmd(batch_id: str) -> None:
    """Cancel a batch: once this returns, no new render of it starts."""
    _farm().cancel(batch_id)
    console.print(f"batch {batch_id}: cancelled")


@cli.command("pause")
@click.argument("batch_id")
def pause_cmd(batch_id: str) -> None:
    """Pause a batch: workers drop its chunks unrendered until `resume`."""
    _farm().pause(batch_id)
    console.print(f"batch {batch_id}: paused")


@cli.command("resume")
@click.argument("batch_id")
def resume_cmd(batch_id: str) -> None:
    """Resume a paused or cancelled batch: enqueue every job without output."""
    result = _farm().resume(batch_id)
    console.print(f"batch {batch_id}: active; {result.enqueued_jobs} jobs enqueued ({result.done} done)")


@cli.command("retry")
@click.argument("batch_id")
def retry_cmd(batch_id: str) -> None:
    """Enqueue a batch's failed jobs again (their attempt counts start over)."""
    count = _farm().retry(batch_id)
    console.print(f"batch {batch_id}: {count} failed jobs enqueued again")


@cli.command("reconcile")
@click.argument("batch_id")
def reconcile_cmd(batch_id: str) -> None:
    """Re-enqueue every job with no output that has not failed. Safe any time, any number of times."""
    r = _farm().reconcile(batch_id)
    console.print(f"batch {batch_id}: {r.total} jobs, {r.done} done, {r.failed} failed,"
                  f" {r.enqueued_jobs} re-enqueued in {r.chunks} chunks")


@cli.command()
@click.option("--limit", type=int, default=20, show_default=True)
def status(limit: int) -> None:
    """Recent batches with their counts."""
    console.print(status_table(_farm().recent(limit)))


@cli.command("fetch")
@click.argument("batch_id")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--contact-sheet", "sheet", type=click.Path(path_type=Path), help="Also write a contact sheet PNG.")
def fetch_cmd(batch_id: str, dest: Path, sheet: Path | None) -> None:
    """Download a batch's images, sidecars and manifest.jsonl into DEST."""
    result = _farm().fetch(batch_id, dest)
    console.print(f"{result.images} images in {result.folder} ({result.missing} missing, {result.failed} failed);"
                  f" manifest {result.manifest}", highlight=False)
    if sheet is not None and result.images:
        console.print(f"contact sheet {contact_sheet(dest, sheet)}", highlight=False)


@cli.command("links")
@click.argument("batch_id")
@click.option("--expires", type=int, default=3600, show_default=True, help="Seconds the links stay valid (max 7 days).")
def links_cmd(batch_id: str, expires: int) -> None:
    """Print short-lived read-only (presigned GET) links to a batch's images, one JSON line each."""
    for row in _farm().links(batch_id, expires):
        click.echo(json.dumps(row))


@cli.command("workers")
@click.option("--check", "check_host", metavar="HOSTNAME", help="Exit 0 only if this worker's heartbeat is live.")
def workers_cmd(check_host: str | None) -> None:
    """Live workers (from their heartbeats): model, device, last heartbeat, counters."""
    beats = _farm().workers()
    if check_host is not None:
        sys.exit(0 if any(b.hostname == check_host for b in beats) else EXIT_FAILED)
    console.print(workers_table(beats))


@cli.command("drain")
@click.argument("worker")
def drain_cmd(worker: str) -> None:
    """Drain WORKER (a name `sdfarm workers` lists): it takes no more chunks, finishes and stores the one
    in hand, then exits 0, as on SIGTERM; past SDFARM_DRAIN_TIMEOUT its chunk is handed back."""
    _farm().drain(worker)
    console.print(f"{printable(worker)}: draining (it finishes the chunk in hand, then exits)", highlight=False)


@cli.command("exporter")
@click.option("--port", type=click.IntRange(1, 65535), default=9401, show_default=True)
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--batches", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Recent batches whose states and jobs are exported.")
def exporter_cmd(port: int, addr: str, batches: int) -> None:
    """Serve the farm's Prometheus metrics (queue depth per model, unacknowledged chunks, live workers,
    batches by state, jobs, ETAs), read from Redis at each scrape."""
    farm = _farm()
    serve_metrics(farm.board, farm.registry, port, addr, batches)


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--loglevel", default="info", show_default=True)
def serve_cmd(host: str, port: int, loglevel: str) -> None:
    """Serve the HTTP API (native under /v1, A1111's under /sdapi/v1, docs at /docs) and the gallery
    (at /). Bearer tokens from SDFARM_API_TOKENS (NAME:TOKEN,...)."""
    from .api.app import serve

    serve(_farm(), host, port, loglevel)


@cli.command("export")
@click.argument("batch_id")
@click.argument("dest")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Images per WebDataset shard.")
def export_cmd(batch_id: str, dest: str, fmt: str, shard_size: int) -> None:
    """Export a batch as imagefolder, webdataset or parquet to DEST (a folder or s3://bucket/prefix)."""
    count, files = _farm().export(batch_id, fmt, dest, shard_size)
    console.print(f"{count} images exported as {fmt}: {len(files)} files under {dest}", highlight=False)


@cli.group()
def dataset() -> None:
    """Nightly dataset generation from specs (templates + wildcards), reproducible per date."""


@dataset.command("run")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--date", "date_", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Run (or backfill) this date; default today in the spec's time zone.")
@click.option("--watch", "then_watch", is_flag=True)
def dataset_run(spec: Path, date_: datetime.datetime | None, then_watch: bool) -> None:
    """Expand SPEC for a date and submit it. The same spec and date render nothing twice."""
    farm = _farm()
    loaded = load_spec(spec)
    day = date_.date() if date_ else (loaded.spec.schedule.run_date(datetime.datetime.now(datetime.timezone.utc))
                                      if loaded.spec.schedule else datetime.date.today())
    result = farm.run_dataset(spec, day)
    console.print(f"dataset {loaded.spec.name} {day}: batch {result.batch_id}: {result.submitted.jobs} jobs,"
                  f" {result.submitted.chunks_enqueued} chunks enqueued, {result.submitted.already_done} already done",
                  highlight=False)
    if then_watch:
        _watch_and_exit(farm, result.batch_id, None)


@dataset.command("list")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False), required=False)
def dataset_list(folder: Path | None) -> None:
    """Each spec's schedule, next and last run with its batch id and counts."""
    farm = _farm()
    folder = folder or farm.settings.datasets_dir
    if folder is None:
        raise click.UsageError("give a FOLDER of dataset specs or set SDFARM_DATASETS_DIR")
    table = Table(title=f"datasets in {folder}")
    rows = farm.datasets(folder)
    for col in ("name", "spec", "schedule", "next_run", "last_run", "last_batch", "counts"):
        table.add_column(col, no_wrap=col in ("last_batch", "next_run"))
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
def scheduler(loglevel: str) -> None:
    """Run the control process: dataset schedules (SDFARM_DATASETS_DIR) and completion hooks."""
    sys.exit(run_scheduler(load_settings(), loglevel))


@cli.command("reproduce", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def reproduce_cmd(args: tuple[str, ...]) -> None:
    """Render a stored image again from its sidecar alone: `sdfarm-worker reproduce` (its --help)."""
    _exec_worker("reproduce", args)


@cli.command()
def models() -> None:
    """The model registry: models, LoRAs, embeddings, VAEs, upscalers and mask models with sources and
    identities (upscalers and mask models fit any family: "-")."""
    farm = _farm()
    registry, bucket = farm.registry, farm.settings.s3_bucket
    for entry in registry:
        source = entry.path or entry.file or (f"s3://{bucket}/{entry.s3_key}" if entry.s3
                                              else f"hub:{entry.hub}@{entry.revision}")
        console.print(f"model      {entry.name:<24} {entry.family:<6} {registry.identity(entry.name)[:10]}  {source}",
                      highlight=False)
    for (kind, name), asset in sorted(registry.assets.items()):
        where = asset.file or asset.path or f"s3://{bucket}/{asset.s3_key}"
        family = "-" if kind in FAMILY_FREE else asset.family
        console.print(f"{kind:<10} {name:<24} {family:<6} {registry.asset_identity(kind, name)[:12]}  {where}",
                      highlight=False)


@cli.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run a render worker (one per GPU): `sdfarm-worker serve` (its --help)."""
    _exec_worker("serve", args)


@cli.command("make-tiny-model", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def make_tiny_model(args: tuple[str, ...]) -> None:
    """Write a tiny pipeline, random or the trained toy (--trained): `sdfarm-worker make-tiny-model` (its --help)."""
    _exec_worker("make-tiny-model", args)


def _exec_worker(command: str, args: tuple[str, ...]) -> NoReturn:
    """Become `sdfarm-worker COMMAND ARGS` (worker/cli.py) in this process: its signals, exit code and
    output are the worker's own, and the producer never imports the worker package."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "worker", command, *args])


@cli.group()
def stack() -> None:
    """The embedded local stack: a real Redis and a real S3 server as child processes."""


_STACK_DIR = click.option("--dir", "state_dir", type=click.Path(path_type=Path), default=Path(".sdfarm/stack"),
                          show_default=True)


def _print_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        click.echo(f"export {key}={shlex.quote(value)}")


def _stack_failed(e: Exception) -> NoReturn:
    click.echo(f"error: {e}", err=True)
    sys.exit(EXIT_FAILED)


@stack.command("up")
@_STACK_DIR
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the stack.")
def stack_up(state_dir: Path, foreground: bool) -> None:
    """Start Redis and S3, or adopt the ones this stack already runs; print the environment that
    points sdfarm at them. Refuses when another process holds one of the stack's ports."""
    from infra.stack import EmbeddedStack, StackError

    s = EmbeddedStack(state_dir)
    try:
        info = s.start()
    except StackError as e:
        _stack_failed(e)
    for line in s.report:  # stderr: stdout stays `eval`-able
        click.echo(line, err=True)
    _print_env(info.env())
    if foreground:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            for line in s.stop():
                click.echo(line, err=True)


@stack.command("down")
@_STACK_DIR
def stack_down(state_dir: Path) -> None:
    """Stop this stack's Redis and S3 and wait until they are gone; say what was stopped."""
    from infra.stack import EmbeddedStack, StackError

    try:
        s = EmbeddedStack.attach(state_dir)
        stopped = s.stop()
    except StackError as e:
        if not (state_dir / "stack.json").exists():
            console.print(f"nothing was running (no stack in {state_dir})", highlight=False)
            return
        _stack_failed(e)
    for line in stopped:
        console.print(line, highlight=False)
    if not stopped:
        console.print("nothing was running", highlight=False)
    still = s.ports_in_use()
    if still:
        _stack_failed(StackError("still in use, not by this stack's recorded servers: " + "; ".join(still)))


@stack.command("env")
@_STACK_DIR
def stack_env(state_dir: Path) -> None:
    """Print `export SDFARM_...` lines for a running stack (eval "$(sdfarm stack env)")."""
    from infra.stack import EmbeddedStack, StackError

    try:
        info = EmbeddedStack.attach(state_dir).info
    except StackError as e:
        _stack_failed(e)
    assert info is not None
    _print_env(info.env())


def main(argv: list[str] | None = None) -> None:
    run_command(cli, "sdfarm", argv)
