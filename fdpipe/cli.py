"""The `fdpipe` command line: extract, distill, finetune, analyze, demo and store tools.

Imports of heavy modules happen inside commands so that `fdpipe --help` is instant. Every user-fixable failure is an
FdpipeError and becomes one line on stderr with exit code 1; click's usage errors exit 2.
"""

from __future__ import annotations

import json
import sys
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


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="fdpipe")
def main() -> None:
    """Feature distillation at scale: run the teacher once, store its whitened features, train many students.

    \b
    fdpipe extract   run a teacher over V augmented views per image and write a feature store
    fdpipe distill   train a student against a store (or a live teacher) by replaying the views
    fdpipe finetune  fine-tune a distilled student (CE, Core-tuning or DeiT-style distillation)
    fdpipe analyze   attention diagnostics of students and teachers
    fdpipe demo      the whole pipeline on Fashion-MNIST with a real pretrained teacher
    fdpipe store     inspect, verify, convert and merge stores
    """


@main.group(cls=Group, context_settings=CONTEXT)
def store() -> None:
    """Inspect, verify, list, convert, merge and finalize feature stores."""


@store.command("info", context_settings=CONTEXT)
@click.argument("store_url", metavar="STORE")
@storage_options_option
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def store_info(store_url: str, storage_options: str | None, as_json: bool) -> None:
    """Describe STORE: teacher, plan, N, V, T, C, grid, dtype, size on disk, bytes per view."""
    from .store import describe, open_store

    info = describe(open_store(store_url, parse_storage_options(storage_options)))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        if k == "plan":
            v = ", ".join(f"{pk}={pv}" for pk, pv in v.items())
        elif k == "size on disk":
            v = f"{v:,} bytes ({v / 2**20:.2f} MiB)"
        click.echo(f"{k:>15}: {v}")


@store.command("verify", context_settings=CONTEXT)
@click.argument("store_url", metavar="STORE")
@click.option("--deep", is_flag=True, help="Also decode every target and check it is finite and whitened.")
@storage_options_option
def store_verify(store_url: str, deep: bool, storage_options: str | None) -> None:
    """Re-hash every file of STORE and compare counts and shapes; exit 1 naming each damaged file."""
    from .store import verify_store

    store_obj, problems = verify_store(store_url, parse_storage_options(storage_options), deep=deep)
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)
    what = "files, counts and targets" if deep else "files and counts"
    click.echo(f"ok: {store_url}: {store_obj.num_shards} shards, {store_obj.num_images} images x {store_obj.views} "
               f"views; {what} verified")


@store.command("finalize", context_settings=CONTEXT)
@click.argument("store_url", metavar="STORE")
@storage_options_option
def store_finalize(store_url: str, storage_options: str | None) -> None:
    """Write STORE's manifest.json once every shard is committed (normally done by the last extract rank)."""
    from .store import finalize

    m = finalize(store_url, parse_storage_options(storage_options))
    click.echo(f"ok: {store_url} is complete: fingerprint {m['fingerprint'][:16]}")


if __name__ == "__main__":  # pragma: no cover
    main()
