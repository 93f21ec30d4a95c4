"""What both command lines (`sdfarm`, `sdfarm-worker`) share: the settings, read once with a one-line
error naming each wrong variable, and the exit codes and messages for what a command raises."""

from __future__ import annotations

import os
import sys
from typing import get_args

import click
import redis
from pydantic import SecretStr, ValidationError
from pydantic_core import ErrorDetails

from .errors import BatchInvalid, ConfigError, SdfarmError, brief, printable
from .redis_target import RedisTarget
from .settings import Settings

EXIT_INVALID = 2
EXIT_FAILED = 1
MAX_ERROR_CHARS = 4000  # one error message as printed (a batch's problems are capped by count)
# settings whose values are never printed, even when they are wrong
SECRET_SETTINGS = frozenset(name for name, f in Settings.model_fields.items()
                            if f.annotation is SecretStr or SecretStr in get_args(f.annotation))


def load_settings() -> Settings:
    """The SDFARM_* settings; a wrong one is a ConfigError naming each wrong variable and what it
    allows, on one line, with its value unless it is a secret."""
    try:
        settings = Settings()
    except ValidationError as e:
        raise ConfigError("; ".join(_setting_problem(err) for err in e.errors())) from None
    try:  # Redis clients parse the URL when they first connect: say it now, without the URL
        RedisTarget.from_settings(settings)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return settings


def _setting_problem(err: ErrorDetails) -> str:
    name = str(err["loc"][0]) if err["loc"] else ""
    given = "" if name in SECRET_SETTINGS else f" (got {brief(err['input'], 60)})"
    return f"SDFARM_{name.upper()}: {err['msg'].removeprefix('Value error, ')}{given}"


def run_command(group: click.Group, prog_name: str, argv: list[str] | None = None) -> None:
    """Run a click command line; what it raises becomes one escaped message and an exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except BatchInvalid as e:  # at most MAX_SHOWN_PROBLEMS lines, each escaped
        click.echo(printable(str(e), newlines=True), err=True)
        sys.exit(EXIT_INVALID)
    except SdfarmError as e:
        click.echo(f"error: {printable(str(e)[:MAX_ERROR_CHARS], newlines=True)}", err=True)
        sys.exit(EXIT_INVALID)
    except redis.exceptions.AuthenticationError:
        click.echo("error: Redis refused the password in SDFARM_REDIS_URL (redis://:PASSWORD@HOST:PORT/DB)", err=True)
        sys.exit(EXIT_INVALID)
    except redis.exceptions.ConnectionError as e:
        click.echo(f"error: cannot reach Redis (SDFARM_REDIS_URL): {e}", err=True)
        sys.exit(EXIT_FAILED)
