"""What every command module shares: click settings, the one-line error handling, common options."""

from __future__ import annotations

import json
from typing import Any

import click

from .errors import FdpipeError

CONTEXT = dict(help_option_names=["-h", "--help"], show_default=True, max_content_width=110)


class Group(click.Group):
    """A click group that turns FdpipeError (and a full disk) into one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FdpipeError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if getattr(e, "errno", None) == 28:
                raise click.ClickException(f"no space left on device ({e.filename or ''}); free space and rerun to resume") from None
            raise


def storage_options_option(f):
    return click.option(
        "--storage-options", "storage_options", default=None, metavar="JSON",
        help="fsspec storage options for remote stores, as JSON (e.g. '{\"anon\": false}').",
    )(f)


def parse_storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise FdpipeError(f"--storage-options is not valid JSON ({e}); pass an object like '{{\"key\": \"...\"}}'") from None
    if not isinstance(value, dict):
        raise FdpipeError("--storage-options must be a JSON object")
    return value
