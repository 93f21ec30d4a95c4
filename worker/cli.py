"""The `sdfarm-worker` command: the render worker and the commands that need the worker's own
dependencies (torch, diffusers). `sdfarm worker`, `sdfarm make-tiny-model` and `sdfarm reproduce` exec
this, so the producer never imports the worker package."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from sdfarm.command import load_settings, run_command

console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """sdfarm's render worker and its tools."""


@cli.command()
@click.option("--model", required=True, help="Registry name of the model this worker serves.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--hostname", default=None, help="Celery node name (default MODEL-PID@HOST).")
@click.option("--loglevel", default="INFO", show_default=True)
def serve(model: str, device: str, hostname: str | None, loglevel: str) -> None:
    """Run a render worker (one per GPU): loads the model once, serves queue render.MODEL."""
    from .main import run_worker

    sys.exit(run_worker(load_settings(), model, device, hostname, loglevel))


@cli.command("make-tiny-model")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="The random weights' seed (not with --trained).")
@click.option("--family", type=click.Choice(["sd15", "sdxl", "sdxl-refiner"]), default="sd15", show_default=True)
@click.option("--trained", is_flag=True,
              help="Copy the toy SD 1.5 model trained on the shapes world (the demo's) instead of random weights.")
def make_tiny_model(dest: Path, seed: int, family: str, trained: bool) -> None:
    """Write a tiny SD1.5-, SDXL- or SDXL-refiner-architecture pipeline (diffusers folder) to DEST:
    random weights from SEED, or with --trained the committed toy model that draws coloured shapes."""
    if trained:
        if family != "sd15":
            raise click.UsageError(f"--trained is an sd15 model; --family {family} has random weights only")
        from .testing.toy import write_trained_model

        try:
            console.print(f"trained toy sd15 model copied to {write_trained_model(dest)}", highlight=False)
        except (FileExistsError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from e
        return
    from .testing import write_tiny_model

    console.print(f"tiny {family} model written to {write_tiny_model(dest, seed, family)}", highlight=False)


@cli.command()
@click.argument("key")
@click.option("--device", default="cpu", show_default=True, help="Where to render: cpu, cuda, cuda:N.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Write the new render here (PNG).")
def reproduce(key: str, device: str, out: Path | None) -> None:
    """Render a stored image again from its sidecar alone (KEY: a job id or renders/<id>.png) and
    print how far the new pixels are from the stored ones."""
    from .reproduce import reproduce as render_again

    r = render_again(load_settings(), key, device)
    if out is not None:
        r.image.save(out)
    same = "identical" if r.max_diff == 0 else f"{r.pixels_differing} of {r.pixels} pixels differ"
    console.print(f"job {r.job_id}: rendered again on {device} (stored by {r.rendered_by}): max difference"
                  f" {r.max_diff}/255, mean {r.mean_diff:.3f}; {same}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    run_command(cli, "sdfarm-worker", argv)
