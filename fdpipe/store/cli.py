"""`fdpipe store ...`: inspect, verify, list, convert, merge and finalize stores."""

from __future__ import annotations

import json
import sys

import click

from ..options import (CONTEXT, Group, cache_dir_option, click_option, parse_storage_options, quiet_option,
                       storage_options_option)

with_storage_options = click_option("storage_options", storage_options_option())
with_quiet = click_option("quiet", quiet_option(), bool)
with_cache_dir = click_option("cache_dir", cache_dir_option(
    "Remote stores: keep downloaded wds shards and index parts here (per store fingerprint), so repeated reads "
    "download nothing."))


def dst_storage_options_option(f):
    return click.option(
        "--dst-storage-options", default=None, metavar="JSON",
        help="fsspec storage options for DST, when they differ from --storage-options (another bucket's credentials).",
    )(f)


@click.group(cls=Group, context_settings=CONTEXT)
def store() -> None:
    """Inspect, verify, list, convert, merge and finalize feature stores."""


@store.command("info", context_settings=CONTEXT)
@click.argument("store_url", metavar="STORE")
@with_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def store_info(store_url: str, storage_options: dict, as_json: bool) -> None:
    """Describe STORE: teacher, plan, N, V, T, C, grid, dtype, size on disk, bytes per view."""
    from .fs import check_local_store

    check_local_store(store_url)  # a missing local path answers now, not after zarr and torch load
    from . import describe, open_store

    info = describe(open_store(store_url, storage_options))
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
@with_storage_options
@with_cache_dir
def store_verify(store_url: str, deep: bool, storage_options: dict, cache_dir: str | None) -> None:
    """Re-hash every file of STORE and compare counts and shapes; exit 1 naming each damaged file.

    Also checks every index part against the manifest and the plan (seeds, counts, the dataset fingerprint), and the
    consolidated index that distill starts from against the parts (current, intact, the same rows).

    --deep also warns (exit 0) when most of each token's channels sit on one value (a student learns little from them).
    Hashes are always taken of the bytes in the store itself; --cache-dir serves the --deep decoding.
    """
    from ..errors import StoreError
    from .fs import check_local_store

    try:
        check_local_store(store_url)  # a missing local path answers now, not after zarr and torch load
    except StoreError as e:
        problems = [str(e)]
    else:
        from . import verify_store

        store_obj, problems = verify_store(store_url, storage_options, deep=deep, cache_dir=cache_dir,
                                           on_warning=lambda line: click.echo(f"warning: {line}", err=True))
    if problems:
        for p in problems:  # one line each, whatever a hostile name put in it
            click.echo(f"error: {' '.join(p.split())}", err=True)
        sys.exit(1)
    what = "files, counts and targets" if deep else "files and counts"
    click.echo(f"ok: {store_url}: {store_obj.num_shards} shards, {store_obj.num_images} images x {store_obj.views} "
               f"views; {what} verified")


@store.command("ls", context_settings=CONTEXT)
@click.argument("store_url", metavar="STORE")
@with_storage_options
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def store_ls(store_url: str, storage_options: dict, as_json: bool) -> None:
    """List STORE's shards (complete or still being written): images, rows, bytes and status.

    Status is ok, pending (not committed yet) or damaged (a file missing or of the wrong size). Sizes come from one
    listing; `fdpipe store verify` re-hashes the bytes.
    """
    from .fs import check_local_store

    check_local_store(store_url)  # a missing local path answers now, not after zarr and torch load
    from .tools import list_shards

    info = list_shards(store_url, storage_options)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{'shard':>6} {'images':>7} {'rows':>8} {'bytes':>14}  status")
    for r in info["shards"]:
        nbytes = "-" if r["bytes"] is None else f"{r['bytes']:,}"
        click.echo(f"{r['shard']:>6} {r['images']:>7} {r['rows']:>8} {nbytes:>14}  {r['status']}")
    shards = info["shards"]
    ok = sum(r["status"] == "ok" for r in shards)
    total = sum(r["bytes"] or 0 for r in shards)
    click.echo(f"{len(shards)} shards ({ok} ok), {total:,} bytes; "
               f"{'complete' if info['complete'] else 'incomplete (no manifest.json)'} {info['layout']} store")


@store.command("convert", context_settings=CONTEXT)
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("--format", "layout", type=click.Choice(["zarr", "wds"]), required=True,
              help="Layout of the new store: zarr (random access) or wds (tar shards to stream).")
@click.option("--embed-images", is_flag=True,
              help="wds only: put each image's bytes in its sample, read from the source the index records.")
@with_storage_options
@dst_storage_options_option
@with_cache_dir
@with_quiet
def store_convert(src: str, dst: str, layout: str, embed_images: bool, storage_options: dict,
                  dst_storage_options: str | None, cache_dir: str | None, quiet: bool) -> None:
    """Copy store SRC into a new store DST in another layout; targets, index and params are kept bit for bit.

    The stored values are copied (int8 with their scales), never dequantized. DST must be new or empty; rerunning
    the same command after a crash resumes it.
    """
    from .fs import check_local_store

    check_local_store(src)  # a missing local path answers now, not after zarr and torch load
    from .tools import convert

    bar = _ShardBar("convert", quiet)
    try:
        r = convert(src, dst, layout, embed_images=embed_images,
                    storage_options=storage_options,
                    dst_storage_options=_dst_options(dst_storage_options), cache_dir=cache_dir, on_shard=bar)
    finally:
        bar.close()
    if r["resumed"]:
        click.echo(f"resumed: {r['resumed']} of {r['shards']} shards were already committed")
    if r["dropped_images"]:
        click.echo(f"note: {r['dropped_images']} embedded images are not copied (zarr stores hold targets only)")
    click.echo(f"ok: {dst} is a complete {layout} store: {r['images']} images in {r['shards']} shards")


@store.command("merge", context_settings=CONTEXT)
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.argument("dst", metavar="DST")
@with_storage_options
@dst_storage_options_option
@with_cache_dir
@with_quiet
def store_merge(a: str, b: str, dst: str, storage_options: dict, dst_storage_options: str | None,
                cache_dir: str | None, quiet: bool) -> None:
    """Join stores A and B (same teacher, whitening, plan and dtype; disjoint images) into a new store DST.

    DST holds A's images, then B's, in A's layout and shard size. DST must be new or empty; rerunning the same
    command after a crash resumes it.
    """
    from .fs import check_local_store

    check_local_store(a)  # a missing local path answers now, not after zarr and torch load
    check_local_store(b)
    from .tools import merge

    bar = _ShardBar("merge", quiet)
    try:
        r = merge(a, b, dst, storage_options=storage_options,
                  dst_storage_options=_dst_options(dst_storage_options), cache_dir=cache_dir, on_shard=bar)
    finally:
        bar.close()
    if r["resumed"]:
        click.echo(f"resumed: {r['resumed']} of {r['shards']} shards were already committed")
    click.echo(f"ok: {dst} is a complete {r['layout']} store: {r['images']} images in {r['shards']} shards of "
               f"{r['shard_size']}")


def _dst_options(text: str | None) -> dict | None:
    return None if text is None else parse_storage_options(text)


class _ShardBar:
    """A progress bar over DST's shards (items/s and ETA), fed by convert/merge's callback."""

    def __init__(self, desc: str, quiet: bool):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, shard_done: int, total: int) -> None:
        if self.bar is None:  # created on the first shard, so that a refusal prints its one line alone
            from ..runtime import progress

            self.bar = progress(total=total, desc=self.desc, unit="shard", disable=self.quiet)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@store.command("finalize", context_settings=CONTEXT)
@click.argument("store_url", metavar="STORE")
@with_storage_options
def store_finalize(store_url: str, storage_options: dict) -> None:
    """Write STORE's manifest.json once every shard is committed (normally done by the last extract rank)."""
    from . import finalize

    m = finalize(store_url, storage_options)
    click.echo(f"ok: {store_url} is complete: fingerprint {m['fingerprint'][:16]}")
