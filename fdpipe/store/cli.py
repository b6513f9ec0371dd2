"""`fdpipe store ...`: inspect, verify, list, convert, merge and finalize stores."""

from __future__ import annotations

import json
import sys

import click

from ..cli_common import CONTEXT, Group, parse_storage_options, storage_options_option


@click.group(cls=Group, context_settings=CONTEXT)
def store() -> None:
    """Inspect, verify, list, convert, merge and finalize feature stores."""


@store.command("info", context_settings=CONTEXT)
@click.argument("store_url", metavar="STORE")
@storage_options_option
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def store_info(store_url: str, storage_options: str | None, as_json: bool) -> None:
    """Describe STORE: teacher, plan, N, V, T, C, grid, dtype, size on disk, bytes per view."""
    from . import describe, open_store

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
    from . import verify_store

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
    from . import finalize

    m = finalize(store_url, parse_storage_options(storage_options))
    click.echo(f"ok: {store_url} is complete: fingerprint {m['fingerprint'][:16]}")
