"""Hostile stores, broken sources and bad settings (issue 16): one line and exit 1, never a traceback, a hang or an
allocation sized by hostile content.

The zoo. Each variant is made here from one small real store per layout (4 photos, effnet-lite0 at 32 px, 2 views,
2 shards), with the manifest's checksum both fixed up (so the hostile content passes the integrity check and reaches
the checks behind it) and not (the integrity check refuses it). Every command that reads the damaged part (verify, verify --deep, info, ls, distill,
convert) must refuse it: exit 1, exactly one line on stderr, no traceback, peak memory under 2 GB, done within
60 s. Commands that do not read it (info on a broken index) must succeed, under the same bounds.

Commands run in a fork server: one subprocess imports fdpipe once and forks a child per command, whose own peak RSS
(ru_maxrss from wait4: the pages it shares with the server count too) and wall time are measured, and whose address
space is capped a few GB above the server's so that a runaway allocation fails instead of swamping the machine. So
hundreds of commands take about a minute instead of an import each. Set FDPIPE_HOSTILE_SUMMARY=path to get the
zoo's figures (variants, refusals, tracebacks, hangs, peak memory) as JSON.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import one_line_error, store_settings, whitened, write_photos, write_store
from fdpipe.store.manifest import canonical, checksum, fingerprint

TIMEOUT_S = 60
MAX_RSS_MB = 2048
EXTRACT = ["--teacher", "effnet-lite0", "--views", "2", "--image-size", "32", "--workers", "0", "--quiet",
           "--student-views", "auto"]  # format 4 with student views: the zoo covers their fields and files too
DISTILL = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--quiet"]
COMMANDS = ("verify", "verify-deep", "info", "ls", "distill", "convert")

SERVER = r"""
import json, os, resource, signal, sys, time, traceback
import pyarrow.dataset, pyarrow.parquet, webdataset, zarr, zarr.codecs  # noqa: F401 - imported once, not per child
import fdpipe.cli, fdpipe.distill.train, fdpipe.extract.loop, fdpipe.store.tools, fdpipe.store.verify  # noqa: F401
from fdpipe.cli import main

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

import gc
gc.freeze()  # the children's collections leave the server's objects alone: far fewer copy-on-write page faults
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.chdir(req.get("cwd") or ".")
        os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (3 << 30),) * 2)
        code = 1
        try:
            main.main(req["args"], prog_name="fdpipe")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > req["timeout"]:
            os.kill(pid, signal.SIGKILL)
            done, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "rss_mb": usage.ru_maxrss / 1024,
                      "seconds": time.monotonic() - t0, "timed_out": timed_out}), flush=True)
"""


@dataclasses.dataclass
class Outcome:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    rss_mb: float
    seconds: float
    timed_out: bool

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()]

    @property
    def error_lines(self) -> list[str]:
        """stderr less the one-line `warning: ...` notes that may precede a refusal (a slower path taken)."""
        return [ln for ln in self.lines if not ln.startswith("warning: ")]

    def refusal_problem(self, message: str | None = None) -> str | None:
        """Why this is not a clean one-line refusal (None when it is)."""
        if self.timed_out:
            return f"hung (killed after {TIMEOUT_S} s)"
        if "Traceback" in self.stderr:
            return "traceback: " + " | ".join(self.lines[-3:])
        if self.rc != 1 or len(self.error_lines) != 1:
            return f"exit {self.rc} with {len(self.lines)} stderr lines: {self.stderr[-400:]!r}"
        if message is not None and message not in self.stderr:
            return f"the refusal does not say {message!r}: {self.stderr.strip()!r}"
        return self.bound_problem()

    def success_problem(self) -> str | None:
        if self.timed_out or self.rc != 0 or "Traceback" in self.stderr:
            return f"exit {self.rc}{' (hung)' if self.timed_out else ''}: {self.stderr[-400:]!r}"
        return self.bound_problem()

    def bound_problem(self) -> str | None:
        if self.rss_mb > MAX_RSS_MB:
            return f"peak memory {self.rss_mb:.0f} MB"
        return None


class Server:
    """The fork server (see the module docstring)."""

    def __init__(self, scratch: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        self.scratch = scratch
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(scratch))
        assert "ready" in json.loads(self.proc.stdout.readline())
        self.outcomes: list[tuple[str, Outcome]] = []

    def run(self, *args: Any, label: str = "", cwd: Path | None = None) -> Outcome:
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        args = [str(a) for a in args]
        self.proc.stdin.write(json.dumps({"args": args, "stdout": str(out), "stderr": str(err),
                                          "timeout": TIMEOUT_S, "cwd": str(cwd or "")}) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        o = Outcome(args, r["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"), r["rss_mb"],
                    r["seconds"], r["timed_out"])
        self.outcomes.append((label, o))
        return o

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()
    path = os.environ.get("FDPIPE_HOSTILE_SUMMARY")
    if path:
        zoo = [o for label, o in s.outcomes if label.startswith("zoo")]
        Path(path).write_text(json.dumps({
            "commands run": len(s.outcomes), "zoo variants": len({label for label, _ in s.outcomes
                                                                   if label.startswith("zoo")}),
            "zoo commands": len(zoo), "one-line refusals": sum(o.rc == 1 and len(o.lines) == 1 for o in zoo),
            "tracebacks": sum("Traceback" in o.stderr for _, o in s.outcomes),
            "hangs": sum(o.timed_out for _, o in s.outcomes),
            "peak rss MB": round(max(o.rss_mb for _, o in s.outcomes)),
            "slowest s": round(max(o.seconds for _, o in s.outcomes), 2)}, indent=2))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "photos", 4)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, photos) -> dict[str, Path]:
    """One small real store per layout: 4 photos, 2 views, 2 shards of 2 images; and the same pair in int4
    ("zarr-int4", "wds-int4") and int4-fixed ("zarr-int4-fixed", "wds-int4-fixed": packed, without scales), whose
    packed targets are files of their own kind, and pca-8 ("zarr-pca", "wds-pca"), whose basis is a file of its
    own."""
    from click.testing import CliRunner

    from fdpipe.cli import main

    root = tmp_path_factory.mktemp("bases")
    runner = CliRunner()
    stores = {}
    for suffix, dtype in (("", "float16"), ("-int4", "int4"), ("-int4-fixed", "int4-fixed"), ("-pca", "pca-8")):
        zarr_, wds_ = root / f"zarr{suffix}", root / f"wds{suffix}"
        r = runner.invoke(main, ["extract", "--data", str(photos), "--out", str(zarr_), "--shard-size", "2",
                                 "--dtype", dtype, *EXTRACT])
        assert r.exit_code == 0, r.output
        r = runner.invoke(main, ["store", "convert", str(zarr_), str(wds_), "--format", "wds", "--quiet"])
        assert r.exit_code == 0, r.output
        stores |= {f"zarr{suffix}": zarr_, f"wds{suffix}": wds_}
    return stores


def commands(store: Path, work: Path, layout: str, photos: Path) -> dict[str, list[Any]]:
    other = "wds" if layout.startswith("zarr") else "zarr"
    return {
        "verify": ["store", "verify", store], "verify-deep": ["store", "verify", "--deep", store],
        "info": ["store", "info", store], "ls": ["store", "ls", store],
        "distill": ["distill", "--store", store, "--data", photos, "--out", work / "run", *DISTILL],
        "convert": ["store", "convert", store, work / "converted", "--format", other, "--quiet"],
    }


# ---------------------------------------------------------------------------------------------- making variants
def load(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def save(root: Path, m: dict[str, Any], fix: bool) -> None:
    """Write a manifest; fix: recompute its fingerprint and checksum so the content passes the integrity check."""
    if fix:
        m["fingerprint"] = fingerprint(m)
        m["checksum"] = checksum(m)
    try:
        raw = canonical(m)
    except ValueError:  # NaN: not representable canonically, written as json writes it
        raw = (json.dumps(m, sort_keys=True, indent=2) + "\n").encode()
    (root / "manifest.json").write_bytes(raw)


def put_file(root: Path, rel: str, data: bytes, fix: bool) -> None:
    """Replace a store file; fix: record its new size, sha256 and crc32c in the manifest, and fix the checksum up."""
    (root / rel).write_bytes(data)
    if fix:
        from fdpipe.store.fs import Digest

        digest = Digest()
        digest.update(data)
        m = load(root)
        for entry in m["shards"]:
            if rel in entry["files"]:
                entry["files"][rel] = digest.entry()
        save(root, m, True)


def edit_manifest(change: Callable[[dict[str, Any], Path], None]) -> Callable[[Path, bool], None]:
    def build(root: Path, fix: bool) -> None:
        m = load(root)
        change(m, root)
        save(root, m, fix)

    return build


def edit_index(change: Callable[[pa.Table], pa.Table | bytes]) -> Callable[[Path, bool], None]:
    rel = "index/part-00000.parquet"

    def build(root: Path, fix: bool) -> None:
        out = change(pq.read_table(root / rel))
        if isinstance(out, pa.Table):
            buf = io.BytesIO()
            # zstd, without statistics: smaller than fdpipe's own parts (snappy), so that a stale edit (the
            # manifest not re-signed) is read to its rows and refused for them, not for its size alone
            pq.write_table(out, buf, compression="zstd", use_dictionary=False, write_statistics=False)
            out = buf.getvalue()
        put_file(root, rel, out, fix)

    build.edits_index_part = True  # see expected_refusals
    return build


def set_column(table: pa.Table, name: str, values: list[Any], type_: pa.DataType | None = None) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, pa.field(name, type_ or table.schema.field(i).type), pa.array(values, type_ or
                                                                                             table.schema.field(i).type))


def replace_row(table: pa.Table, name: str, row: int, value: Any) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    return set_column(table, name, values)


def edit_tar(change: Callable[[tarfile.TarInfo, bytes], tuple[tarfile.TarInfo, bytes]], suffix: str | None = None):
    """Rewrite wds/view-00/shard-000000.tar with its first member (or its first member named *suffix) changed."""
    rel = "wds/view-00/shard-000000.tar"

    def build(root: Path, fix: bool) -> None:
        buf = io.BytesIO()
        with tarfile.open(root / rel) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
            members = src.getmembers()
            first = next(i for i, m in enumerate(members) if suffix is None or m.name.endswith(suffix))
            for i, info in enumerate(members):
                data = src.extractfile(info).read()
                if i == first:
                    info, data = change(info, data)
                dst.addfile(info, io.BytesIO(data) if info.isreg() else None)
        put_file(root, rel, buf.getvalue(), fix)

    build.edits_tar = True  # see expected_refusals
    return build


def _symlink(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    link = tarfile.TarInfo(info.name)
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../outside/secret.txt"
    return link, b""


def _absolute(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info.name = "/" + info.name
    return info, data


def _truncated(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info.size = len(data) // 2
    return info, data[: len(data) // 2]


def _unpacked_width(z: dict[str, Any]) -> None:
    """int4 targets declared one byte a channel: [.., C] where [.., C / 2] belong."""
    z["shape"][-1] *= 2
    z["chunk_grid"]["configuration"]["chunk_shape"][-1] *= 2
    z["codecs"][0]["configuration"]["chunk_shape"][-1] *= 2


def _unpacked_npy(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    """An int4 sample's targets.npy of one byte a channel, as a float16 store would lay it out."""
    packed = np.load(io.BytesIO(data))
    buf = io.BytesIO()
    np.save(buf, np.repeat(packed, 2, axis=-1))
    info.size = len(buf.getvalue())
    return info, buf.getvalue()


def _secret(root: Path) -> Path:
    secret = root.parent / "outside" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("not the store's")
    return secret


def _list_file(name: Callable[[Path], str]) -> Callable[[dict[str, Any], Path], None]:
    def change(m: dict[str, Any], root: Path) -> None:
        data = _secret(root).read_bytes()
        m["shards"][0]["files"][name(root)] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    return change


def edit_metadata_file(rel: str, change: Callable[[bytes], bytes]) -> Callable[[Path, bool], None]:
    """Replace a file of the manifest's metadata_files by change(its bytes); fix: record its new size and sha256."""

    def build(root: Path, fix: bool) -> None:
        data = change((root / rel).read_bytes())
        (root / rel).write_bytes(data)
        if fix:
            m = load(root)
            m["metadata_files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            save(root, m, True)

    return build


def edit_zarr_metadata(change: Callable[[dict[str, Any]], None]) -> Callable[[Path, bool], None]:
    """Change targets.zarr/targets/zarr.json (as JSON); fix: record its new sha256 in the manifest."""

    def edit(raw: bytes) -> bytes:
        meta = json.loads(raw)
        change(meta)
        return json.dumps(meta).encode()

    return edit_metadata_file("targets.zarr/targets/zarr.json", edit)


def _one_giant_shard(m: dict[str, Any], root: Path) -> None:
    """10^12 images in one shard: every count agrees, only the index (4 rows) and the data say otherwise."""
    n = 10**12
    m.update(num_images=n, shard_size=n, counts={"images": n, "rows": 2 * n, "failed": 0})
    m["shards"] = [dict(m["shards"][0], images=n, rows=2 * n)]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[Path, bool], None]
    reads: tuple[str, ...] = COMMANDS  # the commands that read the damaged part, and so must refuse it
    message: str | None = None  # what the refusal names (fixed-up variants)
    layouts: tuple[str, ...] = ("zarr", "wds")
    file: bool = False  # a store file is changed (else the manifest): verify's hashes catch it when not fixed up
    stale: str = "shard 0: "  # what verify's hash check names when the change is not fixed up
    stale_readers: tuple[str, ...] = ()  # commands that read the changed file without using the changed part: they
    # refuse it by its crc32c only when the change is not fixed up


def _unpacked_variants(dtype: str) -> list[Variant]:
    """A packed dtype's targets declared one byte a channel: in zarr.json, and as a wds member of unpacked width."""
    return [Variant(f"{dtype}-zarr-unpacked-width", edit_zarr_metadata(_unpacked_width),
                    ("verify", "verify-deep", "distill", "convert"),
                    "zarr.json: shape is [4, 2, 1, 1280], the manifest says [4, 2, 1, 640]", (f"zarr-{dtype}",),
                    file=True, stale="targets.zarr/targets/zarr.json: "),
            Variant(f"{dtype}-member-unpacked-width", edit_tar(_unpacked_npy, ".targets.npy"), TAR_READERS,
                    "holds uint8 [1, 1280], the manifest says uint8 [1, 640]", (f"wds-{dtype}",), file=True,
                    stale_readers=("distill", "convert"))]


def edit_basis(change: Callable[[bytes], bytes]) -> Callable[[Path, bool], None]:
    """Change a pca store's basis/pca.npz (change returns the new bytes); fix: record it in metadata_files."""
    return edit_metadata_file("basis/pca.npz", change)


def _flip_basis_value(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x10  # a byte of the array, under the zip's CRC-32
    return bytes(out)


def _wider_basis(data: bytes) -> bytes:
    from fdpipe.store import basis

    b = basis.decode(data, "basis", 1280, 8)
    return basis.encode(np.concatenate([b, b[:, :1]], 1))


def _no_basis(root: Path, fix: bool) -> None:
    (root / "basis" / "pca.npz").unlink()


def _pca_variants() -> list[Variant]:
    """A pca store's basis missing, damaged (under the zip's CRC and the manifest's sha256), of another shape, not
    listed, or the quantizer's record of K changed: every command that opens the store names it, since no target
    reads back without it."""
    pca = ("zarr-pca", "wds-pca")
    readers = ("verify", "verify-deep", "info", "ls", "distill", "convert")
    return [Variant("pca-basis-missing", _no_basis, readers, "basis/pca.npz is missing", pca, file=True,
                    stale="basis/pca.npz is missing"),
            Variant("pca-basis-value-flipped", edit_basis(_flip_basis_value), readers, "basis/pca.npz", pca,
                    file=True, stale="basis/pca.npz"),
            Variant("pca-basis-wider", edit_basis(_wider_basis), readers, "basis/pca.npz", pca, file=True,
                    stale="basis/pca.npz"),
            Variant("pca-basis-unlisted", edit_manifest(lambda m, root: m["metadata_files"].pop("basis/pca.npz")),
                    readers, "is not among the manifest's metadata_files", pca),
            Variant("pca-rank-changed", edit_manifest(_set("quantizer.rank", 9)), readers, "records rank 9", pca)]


def _m(name: str, change: Callable[[dict[str, Any], Path], None], message: str) -> Variant:
    return Variant(name, edit_manifest(change), message=message)


def _set(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    def change(m: dict[str, Any], root: Path) -> None:
        *head, last = path.split(".")
        node = m
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value

    return change


INDEX_READERS = ("verify", "verify-deep", "distill", "convert")
TAR_READERS = ("verify-deep", "distill", "convert")

ZOO = [
    _m("layout-unknown", _set("layout", "parquet"), "unknown layout 'parquet'"),
    _m("quantizer-unknown", _set("quantizer.name", "int4-magic"), "unknown quantizer 'int4-magic'"),
    _m("quantizer-not-the-dtype", _set("quantizer.name", "int8-per-token-v2"),
       "quantizer 'int8-per-token-v2' stores int8, but dtype is 'float16'"),
    _m("images-10^12", _set("num_images", 10**12), "more than the 100,000 a store may have"),
    Variant("images-10^12-in-one-shard", edit_manifest(_one_giant_shard), INDEX_READERS, "1,000,000,000,000 images"),
    _m("shard-size-0", _set("shard_size", 0), "shard_size is 0"),
    _m("views-a-string", _set("views", "2"), "views is '2'"),
    _m("shards-null", _set("shards", None), "shards is None"),
    _m("shards-one-missing", lambda m, root: m["shards"].pop(), "shards lists 1 shards"),
    _m("shard-files-missing", lambda m, root: m["shards"][0].pop("files"), "shards[0].files is missing"),
    _m("shard-images-wrong", _set("shards.1.images", 3), "shards[1].images is 3"),
    _m("file-outside-store", _list_file(lambda root: "../outside/secret.txt"), "'../outside/secret.txt'] is not a normalised"),
    _m("file-absolute", _list_file(lambda root: str(root.parent / "outside" / "secret.txt")), "is not a normalised"),
    _m("file-sha-not-hex", lambda m, root: m["shards"][0]["files"]["index/part-00000.parquet"].update(sha256="x"),
       "not 64 lowercase hex"),
    _m("counts-failed-negative", _set("counts.failed", -1), "counts.failed is -1"),
    _m("target-shape-10^9", _set("target_shape", [10**9, 1280]), "values per view"),
    _m("teacher-grid-a-string", _set("teacher.grid", "1x1"), "teacher.grid is '1x1'"),
    _m("plan-scale-reversed", _set("plan.scale", [0.9, 0.1]), "plan.scale is [0.9, 0.1]"),
    _m("flip-p-nan", _set("plan.flip_p", float("nan")), "not in canonical form"),
    Variant("index-column-missing", edit_index(lambda t: t.drop_columns(["status"])), INDEX_READERS,
            "column 'status' is missing", file=True),
    Variant("index-view-a-string", edit_index(lambda t: set_column(t, "view", [str(v) for v in t.column("view")
                                                                               .to_pylist()], pa.string())),
            INDEX_READERS, "column 'view' is string", file=True),
    Variant("index-row-missing", edit_index(lambda t: t.slice(0, t.num_rows - 1)), INDEX_READERS, "3 rows",
            file=True),
    Variant("index-view-out-of-range", edit_index(lambda t: replace_row(t, "view", 1, 5)), INDEX_READERS,
            "view is 5, expected 1", file=True),
    Variant("index-crop-outside", edit_index(lambda t: replace_row(t, "height", 0, 10**6)), INDEX_READERS,
            "is not inside the", file=True),
    Variant("index-key-absolute", edit_index(lambda t: set_column(t, "key", ["/etc/evil"] * 2 + t.column("key")
                                                                  .to_pylist()[2:])), INDEX_READERS,
            "'/etc/evil' is not a relative", file=True),
    Variant("index-status-unknown", edit_index(lambda t: replace_row(t, "status", 0, "maybe")), INDEX_READERS,
            "status is 'maybe'", file=True),
    Variant("index-not-parquet", edit_index(lambda t: b"PAR1 not a parquet file PAR1"), INDEX_READERS,
            "is not a readable parquet file", file=True),
    Variant("zarr-shape-10^9", edit_zarr_metadata(lambda z: z.update(shape=[10**9, *z["shape"][1:]])),
            ("verify", "verify-deep", "distill", "convert"), "zarr.json: shape is [1000000000", ("zarr",), file=True,
            stale="targets.zarr/targets/zarr.json: "),
    Variant("zarr-dtype-float64", edit_zarr_metadata(lambda z: z.update(data_type="float64")),
            ("verify", "verify-deep", "distill", "convert"), "zarr.json: dtype is float64", ("zarr",), file=True,
            stale="targets.zarr/targets/zarr.json: "),
    Variant("tar-symlink-member", edit_tar(_symlink), TAR_READERS, "shard-000000.tar", ("wds",), file=True),
    # int4's packed targets: a zarr array of another dtype or width, a member of unpacked width, the scales gone
    _m("quantizer-int4-not-the-dtype", _set("quantizer.name", "int4-per-token-v1"),
       "quantizer 'int4-per-token-v1' stores int4, but dtype is 'float16'"),
    Variant("int4-zarr-dtype-int16", edit_zarr_metadata(lambda z: z.update(data_type="int16")),
            ("verify", "verify-deep", "distill", "convert"), "zarr.json: dtype is int16, the manifest says uint8", ("zarr-int4",), file=True,
            stale="targets.zarr/targets/zarr.json: "),
    *_unpacked_variants("int4"),
    # int4-fixed: one step for every token, named by the quantizer; the same packed files without scales
    Variant("int4-fixed-step-changed", edit_manifest(_set("quantizer.step", 0.5)), message="records step 0.5",
            layouts=("zarr-int4-fixed", "wds-int4-fixed")),
    *_unpacked_variants("int4-fixed"),
    *_pca_variants(),
    Variant("tar-absolute-member", edit_tar(_absolute), TAR_READERS, "unsafe tar member name", ("wds",),
            file=True),
    _m("student-views-size-0", _set("student_views.size", 0), "student_views.size is 0"),
    _m("student-views-size-10^9", _set("student_views.size", 10**9), "student_views.size is 1000000000"),
    _m("student-views-codec-unknown", _set("student_views.codec", "webp"), "unknown view codec 'webp'"),
    _m("student-views-a-list", _set("student_views", [224]), "student_views is [224]"),
    # a view truncated by its writer (its checksums match it): deep verify decodes every view, convert checks the
    # framing of every view it copies; distill here crops the source (--data)
    Variant("student-view-truncated", edit_tar(_truncated, ".jpg"), ("verify-deep", "convert"),
            "view 0: its stored student view is not a whole jpeg file", ("wds",), file=True,
            stale_readers=("distill", "convert")),
]
CASES = [pytest.param(v, layout, id=f"{v.name}-{layout}") for v in ZOO for layout in v.layouts]


def expected_refusals(variant: Variant, fix: bool, layout: str) -> dict[str, str | None]:
    """{command: what its refusal says} for the commands that must refuse; the others must succeed."""
    if not fix and not variant.file:
        return {name: "checksum mismatch" for name in COMMANDS}
    refusals = {name: variant.message for name in variant.reads}
    if not fix:  # a file changed under the manifest: verify's hashes name it, its readers' crc32c
        refusals |= {"verify": variant.stale, "verify-deep": variant.stale}
        refusals |= {name: "crc32c" for name in variant.stale_readers}
        if getattr(variant.build, "edits_index_part", False) and layout == "zarr":
            # while the manifest still records the part as it was, a zarr distill reads the store's consolidated
            # index (checked and written by finalize) in its place and trains on the rows as they were: not wrong
            # samples. A wds replay reads each shard's part beside its tar, and refuses it.
            refusals.pop("distill", None)
    if getattr(variant.build, "edits_tar", False):
        # re-signed in the manifest or not, the index still holds the tar's samples as written: distill reads each
        # sample by its byte range (format 8) and checks it against the index's crc32c, whatever the edit was
        refusals["distill"] = "do not match their crc32c"
    return refusals


def test_the_untouched_stores_pass_every_command(server, bases, photos, tmp_path):
    for layout, base in bases.items():
        for name, args in commands(base, tmp_path / layout, layout, photos).items():
            problem = server.run(*args, label="control").success_problem()
            assert problem is None, f"{layout} {name}: {problem}"


@pytest.mark.parametrize("variant,layout", CASES)
def test_a_hostile_store_is_refused_in_one_line(server, bases, photos, tmp_path, variant, layout):
    problems = []
    for fix in (True, False):
        work = tmp_path / ("fixed" if fix else "stale")
        store = work / "store"
        shutil.copytree(bases[layout], store)
        variant.build(store, fix)
        refusals = expected_refusals(variant, fix, layout)
        for name, args in commands(store, work, layout, photos).items():
            o = server.run(*args, label=f"zoo {variant.name} {layout} {work.name}")
            problem = o.refusal_problem(refusals[name]) if name in refusals else o.success_problem()
            if problem:
                problems.append(f"{work.name} {name}: {problem}")
        assert not (work / "converted" / "manifest.json").exists()
    assert not problems, "\n".join(problems)


def test_verify_does_not_follow_a_store_file_that_links_outside(server, bases, tmp_path):
    """A listed name inside the store that is a link to a file elsewhere (issue 16 defect 7, by another route)."""
    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    part = store / "index" / "part-00000.parquet"
    outside = _secret(store)
    outside.write_bytes(part.read_bytes())  # the same bytes: the hashes would match
    part.unlink()
    part.symlink_to(outside)
    assert server.run("store", "verify", store, label="link").refusal_problem("leads outside the store") is None


def _draft_claims_10_12_images(root: Path) -> None:
    draft = json.loads((root / "manifest.draft.json").read_text())
    draft.update(num_images=10**12, shard_size=10**6)  # a million shards: more than a store may have
    (root / "manifest.draft.json").write_bytes(canonical(draft))


def _marker_lists_a_file_outside(root: Path) -> None:
    marker = json.loads((root / "_progress" / "shard-00000.json").read_text())
    marker["files"]["../../outside/secret.txt"] = {"bytes": 1, "sha256": "0" * 64}
    (root / "_progress" / "shard-00000.json").write_bytes(canonical(marker))


@pytest.mark.parametrize("change,message", [
    (_draft_claims_10_12_images, "more than the 100,000 a store may have"),
    (_marker_lists_a_file_outside, "'../../outside/secret.txt'] is not a normalised"),
], ids=["draft-10^12-images", "marker-file-outside"])
def test_ls_of_a_hostile_incomplete_store_is_one_line(server, bases, tmp_path, change, message):
    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    (store / "manifest.json").unlink()
    change(store)
    assert server.run("store", "ls", store, label="draft").refusal_problem(message) is None


# ------------------------------------------------------------------------------------------------------ sources
def _csv(folder: Path, rows: list[str], header: str = "path") -> Path:
    path = folder / "list.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_keys_become_relative_member_names(server, photos, tmp_path):
    """A `key` column starting with '/' or holding '..' is normalised: the wds store's member names stay relative
    and the store reads back."""
    images = sorted(photos.rglob("*.png"))[:2]
    data = _csv(tmp_path, [f"{images[0]},/abs/evil", f"{images[1]},../../up/evil"], "path,key")
    out = tmp_path / "s"
    assert server.run("extract", "--data", data, "--out", out, "--format", "wds", *EXTRACT).success_problem() is None
    with tarfile.open(out / "wds" / "view-00" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names and all(not n.startswith("/") and ".." not in n.split("/") for n in names), names
    assert {n.split(".")[0] for n in names} == {"abs/evil", "__/__/up/evil"}
    assert server.run("store", "verify", "--deep", out).success_problem() is None


@pytest.mark.parametrize("rows,header,message", [
    (["{0}", "{1}", "{0}"], "path", "twice (rows 0 and 2)"),  # issue 16 defect 8: AssertionError before
    (["{0},__meta__/x"], "path,key", "that WebDataset skips as metadata"),
    (["{0},/"], "path,key", "is empty"),
], ids=["same-path-twice", "key-wds-metadata", "key-empty"])
def test_a_bad_file_list_is_one_line(server, photos, tmp_path, rows, header, message):
    images = [str(p) for p in sorted(photos.rglob("*.png"))]
    data = _csv(tmp_path, [r.format(*images) for r in rows], header)
    o = server.run("extract", "--data", data, "--out", tmp_path / "s", *EXTRACT)
    assert o.refusal_problem(message) is None
    assert not (tmp_path / "s").exists()


def test_a_wds_source_holding_a_key_twice_is_one_line(server, photos, tmp_path):
    png = sorted(photos.rglob("*.png"))[0].read_bytes()
    shard = tmp_path / "src.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("a.png", "b.png", "a.png"):  # not adjacent: two samples with one key
            info = tarfile.TarInfo(name)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    o = server.run("extract", "--data", shard, "--out", tmp_path / "s", *EXTRACT)
    assert o.refusal_problem("is listed twice") is None


def _png(width: int, height: int, color_type: int = 2, rows: bool = False) -> bytes:
    """A PNG of width x height (color type 2: RGB, 6: RGBA) whose pixels are all grey, or with rows=False only its
    header (no pixel data)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    z = zlib.compressobj(1)
    row = b"\x00" + b"\x80" * (width * {2: 3, 6: 4}[color_type])
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush() if rows else zlib.compress(b"")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, color_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_called_one():
    from fdpipe.data import ImageDecodeError, decode_rgb

    with pytest.raises(ImageDecodeError) as e:
        decode_rgb(_png(40_000, 40_000))
    assert "decompression bomb" in str(e.value) and "truncated or corrupt" not in str(e.value)


def test_an_image_too_big_to_decode_is_refused_from_its_header():
    """13000 x 13000 RGBA is under PIL's bomb limit but took 4.2 GB to decode; the header says so first."""
    from fdpipe.data import ImageDecodeError, decode_rgb

    with pytest.raises(ImageDecodeError, match=r"13000x13000 RGBA .* about 3\.1 GiB to decode, more than the 1 GiB"):
        decode_rgb(_png(13_000, 13_000, 6))


def _index(store: Path) -> dict[str, tuple[str, str | None]]:
    """{key: (status, error)} of a one-shard store's first views."""
    t = pq.read_table(store / "index" / "part-00000.parquet").to_pylist()
    return {r["key"]: (r["status"], r["error"]) for r in t if r["view"] == 0}


def test_extract_records_a_huge_image_as_failed_within_the_memory_bound(server, photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "cat" / "huge.png").write_bytes(_png(13_000, 13_000, 6, rows=True))  # 3 MB of file, 676 MB of pixels
    out = tmp_path / "s"
    assert server.run("extract", "--data", data, "--out", out, *EXTRACT, label="huge").success_problem() is None
    status, error = _index(out)["cat/huge"]
    assert status == "error" and "more than the 1 GiB fdpipe gives one image" in error


def test_a_fifo_named_like_an_image_is_no_hang(server, photos, tmp_path):
    """In a folder it is not an image (skipped); named by a file list, it is recorded as failed."""
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    os.mkfifo(data / "cat" / "x.png")  # opening it would wait for a writer forever
    o = server.run("extract", "--data", data, "--out", tmp_path / "s", *EXTRACT, label="fifo")
    assert o.success_problem() is None and "cat/x" not in _index(tmp_path / "s")
    listed = _csv(tmp_path, ["data/cat/x.png", "data/cat/img1.png"])  # relative to the list: the keys
    o = server.run("extract", "--data", listed, "--out", tmp_path / "l", *EXTRACT, label="fifo")
    assert o.success_problem() is None
    status, error = _index(tmp_path / "l")["data/cat/x"]
    assert status == "error" and "not a regular file" in error


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_name_that_is_not_utf8_is_one_line(server, photos, tmp_path, where):
    """A name of other bytes (os.fsdecode gives surrogates, which a store cannot record): a file in the source, or
    the source folder itself."""
    data = tmp_path / ("data" if where == "file" else os.fsdecode(b"data-\xff"))
    shutil.copytree(photos, data)
    if where == "file":
        shutil.copy(sorted(photos.rglob("*.png"))[0], data / "cat" / os.fsdecode(b"bad-\xff.png"))
    o = server.run("extract", "--data", data, "--out", tmp_path / "s", *EXTRACT, label="utf8")
    assert o.refusal_problem("is not valid UTF-8, which a store cannot record; rename it") is None
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------- CLI bounds
@pytest.mark.parametrize("flag,value,message", [
    ("--views", 100_000, "--views must be at most 1024 (got 100000)"),
    ("--image-size", 100_000, "--image-size must be at most 4096 (got 100000)"),
    ("--workers", -2, "--workers must be at least 0 (got -2)"),
    ("--image-size", 1, "--image-size must be at least 16 (got 1)"),
    ("--seed", -1, "--seed must be at least 0 (got -1)"),
])
def test_an_unbounded_setting_is_one_line_and_leaves_no_draft(server, photos, tmp_path, flag, value, message):
    out = tmp_path / "s"
    o = server.run("extract", "--teacher", "effnet-lite0", "--data", photos, "--out", out, flag, value)
    assert o.refusal_problem(message) is None
    assert not out.exists()
    config = tmp_path / "settings.yaml"
    config.write_text(f"{flag[2:]}: {value}\n")
    o = server.run("extract", "--teacher", "effnet-lite0", "--data", photos, "--out", out, "--config", config)
    assert o.refusal_problem(message) is None and f"--config {config}" in o.stderr
    assert not out.exists()


def test_settings_built_in_python_are_held_to_the_same_bounds(tmp_path):
    from fdpipe.errors import FdpipeError
    from fdpipe.extract.settings import ExtractConfig

    with pytest.raises(FdpipeError, match=r"--views must be at most 1024 \(got 100000\)"):
        ExtractConfig(teacher="effnet-lite0", data="x", out=str(tmp_path), views=100_000)


@pytest.mark.parametrize("name,text,message", [
    ("c.yaml", "views: [1, 2]\n", "views is [1, 2], not a whole number"),  # a TypeError before
    ("c.yaml", "views: true\n", "views is True, not a whole number"),  # taken as 1 before
    ("c.yaml", "views: 2.5\n", "views is 2.5, not a whole number"),  # taken as 2 before
    ("c.yaml", "crop_scale: 0.5\n", "crop_scale is 0.5, not a list of 2 values, each a number"),
    ("c.yaml", "crop_scale: [0.5, true]\n", "crop_scale is [0.5, True], not a list of 2 values, each a number"),
    ("c.yaml", "data: 5\n", "data is 5, not text (quote it)"),
    ("c.yaml", "storage_options: 5\n", "--storage-options must be a JSON object (got 5)"),
    ("c.yaml", "storage_options: {endpoint_url: 5}\n", "--storage-options: endpoint_url is 5, not a string"),
    ("c.yaml", "views: 2\nviews: 3\n", "'views' is given twice (line 2); keep one"),  # the last won before
    ("c.json", '{"views": 2, "views": 3}', "'views' is given twice; keep one"),
    ("c.json", '{"storage_options": {"key": "a", "key": "b"}}', "'key' is given twice; keep one"),
    ("c.yaml", b"views: 2\n\xff\xfe: 1\n", "not UTF-8 text (byte 9 is 0xff); save it as UTF-8"),
], ids=["list-for-int", "bool-for-int", "float-for-int", "scalar-for-pair", "bool-in-pair", "int-for-text",
        "int-for-storage-options", "int-for-endpoint", "yaml-key-twice", "json-key-twice", "nested-key-twice",
        "not-utf8"])
def test_a_config_value_of_the_wrong_shape_is_one_line(server, photos, tmp_path, name, text, message):
    config = tmp_path / name
    (config.write_bytes if isinstance(text, bytes) else config.write_text)(text)
    o = server.run("extract", "--teacher", "effnet-lite0", "--data", photos, "--out", tmp_path / "s", "--config",
                   config, label="config")
    assert o.refusal_problem(f"--config {config}: {message}") is None
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("options,message", [
    ('{"endpoint_url": 5}', "endpoint_url is 5, not a string"),  # a TypeError deep in botocore before
    ('{"client_kwargs": {"endpoint_url": ["x"]}}', "client_kwargs.endpoint_url is ['x'], not a string"),
    ('{"anon": "yes"}', "anon is 'yes', not true or false"),
    ('{"call_timeout": "soon"}', "call_timeout is 'soon', not a number"),
    ('{"key": "a", "key": "b"}', "'key' is given twice; keep one"),
], ids=["endpoint-int", "client-endpoint-list", "anon-text", "timeout-text", "key-twice"])
def test_storage_options_of_the_wrong_type_are_one_line(server, options, message):
    o = server.run("store", "info", "s3://bucket/store", "--storage-options", options, label="storage options")
    assert o.refusal_problem(f"--storage-options: {message}") is None


def test_a_store_of_too_many_shards_is_refused_before_its_draft(tmp_path):
    from fdpipe.errors import StoreError
    from fdpipe.store import StoreWriter

    writer = StoreWriter(str(tmp_path / "s"), store_settings(n=200_001, s=1))
    with pytest.raises(StoreError, match="200,001 shards, more than the 100,000 a store may have; use larger shards"):
        writer.open()
    assert not (tmp_path / "s" / "manifest.draft.json").exists()


# ------------------------------------------------------------------------------------------------------ numbers
# (issue 30) numbers no recipe can use: one line naming the option and the range it may take, before any work;
# each before: exit 0 (a NaN or untrained student), a traceback, a hang or an allocation of petabytes
NUMBERS = [
    ("distill", "--lr", "nan", "--lr must be a finite number, at least 0 (got nan)"),  # a torch ValueError
    ("distill", "--lr", "inf", "--lr must be a finite number, at least 0 (got inf)"),  # a NaN student, exit 0
    ("distill", "--lr", -1, "--lr must be at least 0 (got -1.0)"),
    ("distill", "--min-lr", "nan", "--min-lr must be a finite number, at least 0 (got nan)"),
    ("distill", "--weight-decay", "inf", "--weight-decay must be a finite number, at least 0 (got inf)"),
    ("distill", "--warmup-epochs", "nan", "--warmup-epochs must be a finite number, at least 0 (got nan)"),
    ("distill", "--warmup-epochs", -1, "--warmup-epochs must be at least 0 (got -1.0)"),
    ("distill", "--save-every", -1, "--save-every must be at least 0 (got -1)"),
    ("distill", "--max-steps", -1, "--max-steps must be at least 1 (got -1)"),
    ("distill", "--max-steps", 0, "--max-steps must be at least 1 (got 0)"),  # saved an untrained student
    ("distill", "--drop-path", -0.5, "--drop-path must be at least 0 (got -0.5)"),
    ("distill", "--drop-path", 2, "--drop-path must be at most 1 (got 2.0)"),
    ("distill", "--image-size", 100_000, "--image-size must be at most 4096 (got 100000)"),
    ("distill", "--patch-size", 1000, "--patch-size must be at most 64 (got 1000)"),  # hung
    ("finetune", "--smoothing", 1.5, "--smoothing must be at most 1 (got 1.5)"),
    ("finetune", "--num-classes", 10**9, "--num-classes must be at most 100000 (got 1000000000)"),
    ("analyze", "--alphas", "nan,inf", "--alphas must be a finite number (got nan)"),
]


def _stage(command: str, bases: dict[str, Path], photos: Path, out: Path) -> list[Any]:
    """A command of `command` that runs as it is, into `out`."""
    return {"distill": ["distill", "--store", bases["zarr"], "--out", out, *DISTILL],
            "finetune": ["finetune", "--init", "scratch", "--out", out, *(a.format(photos=photos) for a in FINETUNE)],
            "analyze": ["analyze", "vit_tiny_patch16_224@init", "--data", photos, "--out", out, "--images", "2",
                        "--quiet"]}[command]


@pytest.mark.parametrize("command,flag,value,message", NUMBERS,
                         ids=[f"{c}{f}={v}" for c, f, v, _ in NUMBERS])
def test_a_number_out_of_range_is_one_line_naming_the_range(server, bases, photos, tmp_path, command, flag, value,
                                                            message):
    out = tmp_path / "out"
    o = server.run(*_stage(command, bases, photos, out), flag, value, label="numbers")
    assert o.refusal_problem(message) is None
    config = tmp_path / "settings.yaml"
    config.write_text(f"{flag[2:]}: {value}\n")
    o = server.run(*_stage(command, bases, photos, out), "--config", config, label="numbers")
    assert o.refusal_problem(f"--config {config}: {message}") is None
    assert not out.exists()


@pytest.mark.parametrize("cls,values,message", [
    ("fdpipe.distill.settings.DistillConfig", dict(store="s", lr=float("nan")), "--lr must be a finite number"),
    ("fdpipe.finetune.settings.FinetuneConfig", dict(init="scratch", data="d", smoothing=1.5),
     "--smoothing must be at most 1"),
    ("fdpipe.analyze.settings.AnalyzeConfig", dict(checkpoints=("c",), data="d", alphas=(0.0, float("inf"))),
     "--alphas must be a finite number"),
], ids=["distill", "finetune", "analyze"])
def test_settings_built_in_python_refuse_the_same_numbers(tmp_path, cls, values, message):
    import importlib

    from fdpipe.errors import FdpipeError

    module, name = cls.rsplit(".", 1)
    with pytest.raises(FdpipeError, match=message):
        getattr(importlib.import_module(module), name)(out=str(tmp_path), **values)


@pytest.mark.parametrize("label,kind,command", [
    (-5, "csv", "extract"), (-5, "csv", "finetune"),  # recorded in the store, and fine-tuned on, before
    (-3, "csv", "finetune"),  # a traceback in the loss
    (10**12, "csv", "finetune"), (2**63 - 1, "parquet", "finetune"),  # a head of 10^12 classes: an allocation error
], ids=["csv-5-extract", "csv-5", "csv-3", "csv-10^12", "parquet-2^63-1"])
def test_an_integer_label_that_is_no_class_index_is_one_line(server, photos, tmp_path, label, kind, command):
    images = [str(p) for p in sorted(photos.rglob("*.png"))[:2]]
    if kind == "csv":
        data = _csv(tmp_path, [f"{images[0]},0", f"{images[1]},{label}"], "path,label")
    else:
        data = tmp_path / "list.parquet"
        pq.write_table(pa.table({"path": images, "label": pa.array([0, label], pa.int64())}), data)
    out = tmp_path / "out"
    args = {"extract": ["extract", "--data", data, "--out", out, *EXTRACT],
            "finetune": ["finetune", "--init", "scratch", "--data", data, "--val", data, "--out", out,
                         *FINETUNE[4:]]}[command]
    o = server.run(*args, label="numbers")
    assert o.refusal_problem(f"{data} row 1 has label {label}; integer labels are class indices from 0 to "
                             "99,999") is None
    assert not out.exists()


HUGE = "asks for a model of 1.7e+12 parameters (embed_dim 60000, depth 40), more than the 4 billion fdpipe builds"


def test_a_checkpoint_asking_for_a_huge_model_is_one_line(server, distill_run, photos, tmp_path):
    """A config.json whose model_args ask for embed_dim 60000 and depth 40: timm started allocating 7 TB."""
    run = Path(shutil.copytree(distill_run, tmp_path / "huge"))
    config = json.loads((run / "config.json").read_text())
    config["model_args"].update(embed_dim=60_000, depth=40)
    (run / "config.json").write_text(json.dumps(config))
    finetune = [a.format(photos=photos) for a in FINETUNE]
    for args in (["finetune", "--init", run, "--out", tmp_path / "ft", *finetune],
                 ["finetune", "--init", "scratch", "--like", run, "--out", tmp_path / "ft", *finetune],
                 ["analyze", run, "--data", photos, "--out", tmp_path / "an", "--images", "2", "--quiet"],
                 ["analyze", f"{run}@init", "--data", photos, "--out", tmp_path / "an", "--images", "2", "--quiet"]):
        o = server.run(*args, label="numbers")
        assert o.refusal_problem(HUGE) is None, args[:4]


def test_a_student_of_too_many_patches_is_one_line(server, bases, tmp_path):
    """4096 px in 1 px patches is within each option's bounds; its 16.7 million tokens are not."""
    o = server.run("distill", "--store", bases["zarr"], "--out", tmp_path / "run", *DISTILL, "--image-size", 4096,
                   "--patch-size", 1, label="numbers")
    assert o.refusal_problem("asks for a 4096x4096 patch grid (img_size 4096, patch_size 1), more than the 128x128")\
        is None


def test_a_loss_that_turns_non_finite_stops_and_keeps_the_last_finite_state(server, bases, distill_run, tmp_path):
    """--lr 1e30 is finite, so the settings take it; the first step at it makes the weights huge and the next loss
    NaN. The run stops naming that step, exit 1, with train_state.pt from the step before and the student of the
    earlier run as it was: nothing trained on the NaN is saved."""
    import torch

    run = Path(shutil.copytree(distill_run, tmp_path / "run"))
    student = (run / "student.safetensors").read_bytes()
    before = torch.load(run / "train_state.pt", weights_only=True)["position"]["step"]
    o = server.run("distill", "--store", bases["zarr"], "--out", run, "--resume", "--epochs", "3", "--batch-size", "2",
                   "--workers", "0", "--quiet", "--lr", "1e30", "--warmup-epochs", "0", "--save-every", "1",
                   label="numbers")
    assert o.refusal_problem(f"step {before + 2} (epoch 1): the loss is not finite (NaN or inf)") is None
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["position"]["step"] == before + 1
    assert all(bool(t.isfinite().all()) for t in state["model"].values() if t.is_floating_point())
    assert (run / "student.safetensors").read_bytes() == student


# ------------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name,text,message", [
    ("c.yaml", "lr: .nan\n", "--lr must be a finite number, at least 0 (got nan)"),  # a torch ValueError before
    ("c.json", '{"lr": NaN}', "--lr must be a finite number, at least 0 (got nan)"),
    ("c.yaml", "clip_grad: .inf\n", "--clip-grad must be a finite number, at least 0 (got inf)"),  # not an option
    ("c.yaml", "crop_scale: [.nan, 1.0]\n", "--crop-scale must be a finite number (got nan)"),
    ("c.yaml", "lr: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested too deep to read"),  # a RecursionError before
    ("c.yaml", "lr: " + "{a: " * 10_000 + "}" * 10_000 + "\n", "nested too deep to read"),  # block style: 50 MB
    ("c.json", '{"lr": ' + "[" * 10_000 + "]" * 10_000 + "}", "nested too deep to read"),
], ids=["yaml-nan", "json-nan", "yaml-inf-not-an-option", "nan-in-pair", "yaml-lists-10^4-deep",
        "yaml-mappings-10^4-deep", "json-10^4-deep"])
def test_a_config_of_non_finite_or_deeply_nested_values_is_one_line(server, bases, tmp_path, name, text, message):
    config = tmp_path / name
    config.write_text(text)
    out = tmp_path / "run"
    o = server.run("distill", "--store", bases["zarr"], "--out", out, *DISTILL, "--config", config, label="configs")
    assert o.refusal_problem(f"--config {config}: {message}") is None
    assert not out.exists()


# --------------------------------------------------------------------------------------------- tampered stores
# Issue 30: stores altered with every checksum recomputed, so that only a consistency check can catch them. `fdpipe
# store verify --deep` names the inconsistency, and distill refuses the store before its first step: its epoch is one
# batch of the 4 images, so that a wds tar (checked as it is first read, before any of its samples is used) is read
# before that step too.
TAMPER_DISTILL = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--quiet"]


def _swap_images(columns: tuple[str, ...]) -> Callable[[pa.Table], pa.Table]:
    """The index part with images 0 and 1 (2 views each) trading their `columns`."""
    def change(t: pa.Table) -> pa.Table:
        for name in columns:
            values = t.column(name).to_pylist()
            values[0:2], values[2:4] = values[2:4], values[0:2]
            t = set_column(t, name, values)
        return t

    return change


def _rows(**edits: dict[int, Any]) -> Callable[[pa.Table], pa.Table]:
    """The index part with {row: value} set in each named column."""
    def change(t: pa.Table) -> pa.Table:
        for name, by_row in edits.items():
            for row, value in by_row.items():
                t = replace_row(t, name, row, value)
        return t

    return change


def _and_manifest(first: Callable[[Path, bool], None], change: Callable[[dict[str, Any], Path], None]):
    def build(root: Path, fix: bool) -> None:
        first(root, fix)
        edit_manifest(change)(root, fix)

    return build


def _recount(m: dict[str, Any], root: Path) -> None:
    """The dataset fingerprint of the (altered) index rows, as finalize computes it: a tamperer can do that too."""
    from fdpipe.store import index as index_mod

    m["dataset_fingerprint"] = index_mod.dataset_digest(pq.read_table(p) for p in sorted((root / "index").iterdir()))


def _zero_targets(root: Path, fix: bool) -> None:
    """The store rewritten through fdpipe's own writer (every checksum right) with all its targets zero."""
    from fdpipe.store import StoreWriter, open_store

    store = open_store(str(root))
    out = root.parent / "zeroed"
    w = StoreWriter(str(out), store.settings)
    w.open()
    for shard in range(store.num_shards):
        items = list(store.iter_stored([shard]))
        scales = None if items[0].scales is None else np.stack([it.scales for it in items])
        w.write_stored(shard, np.zeros_like(np.stack([it.values for it in items])), scales,
                       [r for it in items for r in it.rows],
                       student_views=None if store.student_views is None else [it.student_views for it in items])
    assert w.try_finalize()
    shutil.rmtree(root)
    out.rename(root)


def _tar_rewrite(members: Callable[[list[tuple[tarfile.TarInfo, bytes]]], list[tuple[tarfile.TarInfo, bytes]]]):
    """Rewrite wds/view-00/shard-000000.tar with its (member, bytes) list changed; the manifest fixed up."""
    rel = "wds/view-00/shard-000000.tar"

    def build(root: Path, fix: bool) -> None:
        with tarfile.open(root / rel) as src:
            listed = [(info, src.extractfile(info).read()) for info in src.getmembers()]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
            for info, data in members(listed):
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
        put_file(root, rel, buf.getvalue(), fix)

    return build


def _params_top_moved(listed: list[tuple[tarfile.TarInfo, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The first sample's params.json with its crop box one pixel lower than the index says."""
    first = next(i for i, (info, _) in enumerate(listed) if info.name.endswith(".params.json"))
    row = json.loads(listed[first][1])
    row["top"] += 1
    return [*listed[:first], (listed[first][0], json.dumps(row, sort_keys=True).encode()), *listed[first + 1:]]


def _first_sample_again(listed: list[tuple[tarfile.TarInfo, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The first sample's members once more at the end of the tar."""
    key = listed[0][0].name.split(".")[0]
    again = [(tarfile.TarInfo(info.name), data) for info, data in listed if info.name.split(".")[0] == key]
    return listed + again


def _drop_zarr_crc(meta: dict[str, Any]) -> None:
    inner = meta["codecs"][0]["configuration"]["codecs"]
    inner[:] = [c for c in inner if c["name"] != "crc32c"]


@dataclasses.dataclass(frozen=True)
class Tampered:
    name: str
    build: Callable[[Path, bool], None]
    verify: str | dict[str, str] | None  # what `verify --deep` names ({layout: ...}; None: it cannot tell)
    distill: str | None  # what distill's refusal names (None: distill reads nothing that shows it; not run)
    layouts: tuple[str, ...] = ("zarr", "wds")


TAMPERED = [
    Tampered("keys-swapped", edit_index(_swap_images(("key", "image_sha256", "source"))),
             "for that image and view", "for that image and view"),
    Tampered("rows-swapped", _and_manifest(edit_index(_swap_images(
        ("key", "image_sha256", "source", "label", "seed", "top", "left", "height", "width", "flip", "orig_height",
         "orig_width"))), _recount), {"zarr": "consolidated_index.parquet is stale",
                                      "wds": "(a sample out of order or twice)"},
             "the store's rows were moved between images"),
    Tampered("recorded-size-views-disagree", edit_index(_rows(orig_height={1: 49})), "but view 0 of the image says 48",
             "but view 0 of the image says 48"),
    Tampered("recorded-size-enlarged", edit_index(_rows(orig_height={0: 148, 1: 148}, top={0: 100})),
             "in its recorded 148 x 64 pixels is not the plan's",
             "is 48 x 64 pixels, the store recorded 148 x 64 for it"),
    Tampered("all-zero-targets", _zero_targets, "all 8 decoded views have all-zero targets",
             "every target of this batch of 4 views is zero"),
    # a tar rewritten and re-signed in the manifest, its index not: distill reads each sample by its byte range,
    # checked against the index's crc32c, and a sample appended past the indexed ones is never read
    Tampered("params-crop-differs", _tar_rewrite(_params_top_moved), "params.json: view 0's top is",
             "do not match their crc32c", ("wds",)),
    Tampered("sample-twice", _tar_rewrite(_first_sample_again), "holds 3 samples where shard 0 has 2 images",
             None, ("wds",)),
    Tampered("status-error-uncounted", edit_index(_rows(status={0: "error", 1: "error"})),
             "the index marks 1 image as failed", "the index marks 1 image as failed"),
    Tampered("status-error-counted", _and_manifest(edit_index(_rows(status={0: "error", 1: "error"})),
                                                   _set("counts.failed", 1)),
             {"zarr": "is recorded as failed (status error) but holds targets",
              "wds": "params.json: view 0's status is 'ok', the index says 'error'"}, None),
    Tampered("seed-duplicated", edit_index(lambda t: replace_row(t, "seed", 1, t.column("seed")[0].as_py())),
             "for that image and view", "for that image and view"),
    Tampered("dataset-fingerprint", edit_manifest(_set("dataset_fingerprint", "0" * 64)),
             "the manifest says 0000000000000000", "the manifest says 0000000000000000"),
    Tampered("manifest-without-crc32c", edit_manifest(lambda m, root: [f.pop("crc32c") for f in
                                                                      m["shards"][0]["files"].values()]),
             "crc32c is missing", "crc32c is missing"),
    Tampered("manifest-crc32c-wrong", edit_manifest(lambda m, root: m["shards"][0]["files"][
        "index/part-00000.parquet"].update(crc32c="00000000")),
             "manifest says 00000000 (the manifest was altered)", None),
    Tampered("zarr-json-without-crc32c", edit_zarr_metadata(_drop_zarr_crc),
             "which every format-3 store has",
             "which every format-3 store has", ("zarr",)),
]


@pytest.mark.parametrize("case,layout", [pytest.param(c, layout, id=f"{c.name}-{layout}") for c in TAMPERED
                                         for layout in c.layouts])
def test_a_tampered_store_is_refused_by_verify_deep_and_by_distill_before_a_step(server, bases, photos, tmp_path,
                                                                                 case, layout):
    store = tmp_path / "store"
    shutil.copytree(bases[layout], store)
    case.build(store, True)
    verify, distill = (want.get(layout) if isinstance(want, dict) else want for want in (case.verify, case.distill))
    o = server.run("store", "verify", "--deep", store, label="tampered")
    assert (o.refusal_problem(verify) if verify else o.success_problem()) is None
    if distill is None:
        return
    run = tmp_path / "run"
    o = server.run("distill", "--store", store, "--data", photos, "--out", run, *TAMPER_DISTILL, label="tampered")
    assert o.refusal_problem(distill) is None
    metrics = run / "metrics.jsonl"  # refused before its first step: nothing trained, nothing logged
    assert not (run / "train_state.pt").exists() and not (metrics.exists() and metrics.read_text().strip())


def test_a_resume_from_another_directory_is_refused_and_distill_finds_the_images_from_anywhere(server, tmp_path):
    """Issue 30: the store records its source's absolute spec, so a resume elsewhere with another `photos/` is
    refused in one line naming both, and distill without --data finds the images from a third directory."""
    a, b, c = (tmp_path / name for name in "abc")
    write_photos(a / "photos", 4)
    write_photos(b / "photos", 4, size=(40, 56))  # the same names, other pixels
    c.mkdir()
    store = tmp_path / "store"
    args = ["extract", "--data", "photos", "--out", store, "--shard-size", "2", *EXTRACT]
    assert server.run(*args, cwd=a, label="resume").success_problem() is None
    assert load(store)["data"]["spec"] == str(a / "photos")
    (store / "manifest.json").unlink()  # a crash before shard 1 was committed
    (store / "_progress" / "shard-00001.json").unlink()
    o = server.run(*args, cwd=b, label="resume")
    assert o.refusal_problem(f"was started on the images at {a / 'photos'}, not {b / 'photos'}") is None
    (a / "photos" / "cat" / "img1.png").rename(a / "photos" / "cat" / "img9.png")  # here, but other images now
    o = server.run(*args, cwd=a, label="resume")
    assert o.refusal_problem("shard 0 holds image 0 'cat/img1'") is None
    (a / "photos" / "cat" / "img9.png").rename(a / "photos" / "cat" / "img1.png")
    assert server.run(*args, cwd=a, label="resume").success_problem() is None
    assert server.run("store", "verify", "--deep", store, cwd=c, label="resume").success_problem() is None
    o = server.run("distill", "--store", store, "--out", c / "run", *DISTILL, cwd=c, label="resume")
    assert o.success_problem() is None


def test_the_recorded_spec_is_the_one_open_source_gives(photos, tmp_path, monkeypatch):
    """What a store records (data.absolute_spec, computed without opening the source) is the source's own spec, for
    every form of a relative --data: else a resume in the same directory would be refused."""
    from fdpipe.data import absolute_spec, open_source

    shutil.copytree(photos, tmp_path / "photos")
    (tmp_path / "shards").mkdir()
    pngs = sorted(photos.rglob("*.png"))
    for s in range(2):
        with tarfile.open(tmp_path / "shards" / f"shard-{s:06d}.tar", "w") as tar:
            tar.add(pngs[s], arcname=f"img{s}.png")
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"{p}\n" for p in pngs))
    monkeypatch.chdir(tmp_path)
    for spec in ("photos", " photos/ ", "list.csv", "shards/shard-{000000..000001}.tar", "shards/*.tar",
                 "shards/shard-000000.tar::shards/shard-000001.tar"):
        assert absolute_spec(spec) == open_source(spec).spec and str(tmp_path) in absolute_spec(spec), spec
    assert absolute_spec("fashion-mnist") == "fashion-mnist:train" and absolute_spec("s3://b/x") == "s3://b/x"


def test_a_store_recording_a_relative_spec_resolves_it_as_before(server, bases, photos, tmp_path):
    """Stores written before recorded --data as typed: a relative spec still resolves against the working
    directory (distill without --data), and a resume there is not refused for it."""
    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    m = load(store)
    m["data"]["spec"] = photos.name
    save(store, m, True)
    o = server.run("distill", "--store", store, "--out", tmp_path / "run", *DISTILL, cwd=photos.parent, label="old")
    assert o.success_problem() is None
    draft = json.loads((store / "manifest.draft.json").read_text())
    draft["data"]["spec"] = photos.name
    (store / "manifest.draft.json").write_bytes(canonical(draft))
    (store / "manifest.json").unlink()
    o = server.run("extract", "--data", photos.name, "--out", store, "--shard-size", "2", *EXTRACT,
                   cwd=photos.parent, label="old")
    assert o.success_problem() is None and "resumed: 2 of 2 shards" in o.stdout


# ---------------------------------------------------------------------------------------------- drafts, locks
def _synthetic(tmp_path: Path, name: str, key_prefix: str = "", n: int = 5) -> str:
    """A small synthetic store (conftest's) whose keys carry `key_prefix`."""
    settings = store_settings("zarr", n=n, s=2)
    url = str(tmp_path / name)
    write_store(url, settings, whitened(np.random.default_rng(0), (n, 2, 4, 8)),
                edit_row=(lambda r: dict(r, key=key_prefix + r["key"],
                                         seed=settings.plan.view_seed(key_prefix + r["key"], r["view"])))
                if key_prefix else None)
    return url


@pytest.mark.parametrize("failure", ["crash", "enospc"])
def test_a_failed_first_commit_of_the_draft_resumes(cli, tmp_path, monkeypatch, failure):
    """A crash (or a full disk) while the draft is moved into place leaves only `.tmp-*-manifest.draft.json`: the
    rerun resumes instead of calling the folder foreign (issue 16 defect 4)."""
    from fdpipe.store.fs import StoreLocation
    from fdpipe.store.tools import convert

    src = _synthetic(tmp_path, "src")
    dst = tmp_path / "dst"
    real = StoreLocation.commit

    def failing(self, tmp, rel):
        if rel == "manifest.draft.json":
            if failure == "crash":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tmp, rel)

    monkeypatch.setattr(StoreLocation, "commit", failing)
    if failure == "crash":
        with pytest.raises(KeyboardInterrupt):
            convert(src, str(dst), "wds")
    else:
        r = cli("store", "convert", src, dst, "--format", "wds")
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert [p.name for p in dst.iterdir()] and all(p.name.startswith(".tmp-") for p in dst.iterdir())
    monkeypatch.setattr(StoreLocation, "commit", real)
    r = cli("store", "convert", src, dst, "--format", "wds")
    assert r.exit_code == 0, r.output
    assert cli("store", "verify", "--deep", dst).exit_code == 0


def test_a_second_writer_of_a_local_store_is_refused_in_one_line(server, tmp_path):
    from fdpipe.store import StoreWriter

    src = _synthetic(tmp_path, "src")
    dst = tmp_path / "dst"
    writing = StoreWriter(str(dst), store_settings("wds", n=5, s=2), role="DST")  # another convert, still running
    writing.open()
    o = server.run("store", "convert", src, dst, "--format", "wds")
    assert o.refusal_problem("is being written by another process") is None
    del writing  # the lock goes with the writer: now the same command resumes and finishes
    assert server.run("store", "convert", src, dst, "--format", "wds").success_problem() is None


def test_a_second_run_into_one_out_folder_is_refused_in_one_line(server, bases, photos, tmp_path):
    from fdpipe.runtime import Ranks
    from fdpipe.training import RunFiles

    out = tmp_path / "run"
    running = RunFiles(out, out / "train_state.pt", Ranks(), {}, lambda state: None)
    o = server.run("distill", "--store", bases["zarr"], "--data", photos, "--out", out, *DISTILL)
    assert o.refusal_problem("is in use by another run") is None
    assert not (out / "metrics.jsonl").exists()
    del running


# ----------------------------------------------------------------------------------------- links out of a store
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _link_out(store: Path, folder: str) -> Path:
    """Move the store's `folder` out of it and leave a link in its place, with a crashed writer's temporary file in
    it (what finalize's cleanup deletes); returns where the folder now is."""
    outside = store.parent / "outside" / folder
    outside.parent.mkdir(exist_ok=True)
    shutil.move(store / folder, outside)
    (store / folder).symlink_to(outside, target_is_directory=True)
    (outside / ".tmp-0123456789ab-part").write_bytes(b"a file of someone else's")
    return outside


@pytest.mark.parametrize("layout,folder,missing,command", [
    ("zarr", "index", True, "extract"),  # wrote its index parts through the link before
    ("zarr", "targets.zarr", True, "extract"),
    ("zarr", "_progress", False, "extract"),  # every shard committed, no manifest: the resumed run finalizes
    ("wds", "wds", False, "extract"),  # deleted the .tmp-* files behind the link before
    ("wds", "wds", False, "finalize"),
    ("zarr", "index", False, "finalize"),
], ids=["extract-index", "extract-targets", "extract-progress", "extract-wds", "finalize-wds", "finalize-index"])
def test_nothing_is_written_or_deleted_through_a_link_out_of_the_store(server, bases, photos, tmp_path, layout,
                                                                       folder, missing, command):
    store = tmp_path / "store"
    shutil.copytree(bases[layout], store)
    (store / "manifest.json").unlink()  # a crash before the manifest; missing: before shard 1's marker too
    if missing:
        (store / "_progress" / "shard-00001.json").unlink()
    outside = _link_out(store, folder)
    before = _files(outside)
    args = {"extract": ["extract", "--data", photos, "--out", store, "--shard-size", "2", "--format", layout,
                        *EXTRACT], "finalize": ["store", "finalize", store]}[command]
    o = server.run(*args, label="link")
    assert o.refusal_problem(f"{store / folder} is a link that leads outside the store") is None
    assert _files(outside) == before and not (store / "manifest.json").exists()


def test_a_link_inside_the_store_is_still_written_through(cli, tmp_path):
    """Only links that leave the store are refused: a folder linked to another place inside it is the store's."""
    from fdpipe.store import finalize

    src = _synthetic(tmp_path, "src")
    (Path(src) / "manifest.json").unlink()
    shutil.move(Path(src) / "index", Path(src) / "elsewhere")
    (Path(src) / "index").symlink_to(Path(src) / "elsewhere", target_is_directory=True)
    (Path(src) / "elsewhere" / ".tmp-0123456789ab-part").write_bytes(b"debris")
    finalize(src)
    assert (Path(src) / "manifest.json").exists() and not (Path(src) / "elsewhere" / ".tmp-0123456789ab-part").exists()


# ------------------------------------------------------------------------------------------------- special files
def _special(path: Path, kind: str) -> None:
    """Put a FIFO (opening it waits for a writer forever), a link to /dev/zero (it never ends) or a directory where
    a regular file belongs."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    {"fifo": os.mkfifo, "zero": lambda p: p.symlink_to("/dev/zero"), "dir": Path.mkdir}[kind](path)


@pytest.mark.parametrize("rel,kind,what", [
    ("manifest.json", "fifo", "a FIFO"), ("manifest.json", "zero", "a character device"),
    ("manifest.json", "dir", "a directory"), ("index/part-00000.parquet", "fifo", "a FIFO"),
    ("index/part-00000.parquet", "zero", "a character device"), ("targets.zarr/targets/c/0/0/0/0", "fifo", "a FIFO"),
    ("targets.zarr/targets/zarr.json", "fifo", "a FIFO"),
], ids=["manifest-fifo", "manifest-dev-zero", "manifest-dir", "index-fifo", "index-dev-zero", "zarr-shard-fifo",
        "zarr-json-fifo"])
def test_a_special_file_in_a_store_is_one_line(server, bases, photos, tmp_path, rel, kind, what):
    """Hung (FIFO, /dev/zero: tensorstore too, on a zarr shard) or a traceback (a directory) before: every command
    that reads it names it."""
    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    _special(store / rel, kind)
    reads = ["info", "verify", "ls"] if rel == "manifest.json" else ["verify", "distill"]
    if rel.startswith("index/"):  # a zarr replay reads the consolidated index, not the parts: trains, not hangs
        reads.remove("distill")
        assert server.run(*commands(store, tmp_path, "zarr", photos)["distill"], label="special").success_problem() \
            is None
    for name, args in commands(store, tmp_path, "zarr", photos).items():
        if name in reads:
            message = f"{store / rel} is {what}, not a regular file"
            if name == "verify" and kind == "zero" and rel != "manifest.json":
                message = f"{rel}: a link that leads outside the store"  # verify reads no link out of the store
            o = server.run(*args, label="special")
            assert o.refusal_problem(message) is None, name


def test_a_fifo_given_as_a_config_or_a_list_is_one_line(server, photos, tmp_path):
    os.mkfifo(tmp_path / "settings.yaml")
    os.mkfifo(tmp_path / "list.csv")
    o = server.run("extract", "--data", photos, "--out", tmp_path / "s", "--config", tmp_path / "settings.yaml",
                   *EXTRACT, label="special")
    assert o.refusal_problem(f"--config {tmp_path / 'settings.yaml'}: it is a FIFO, not a regular file") is None
    o = server.run("extract", "--data", tmp_path / "list.csv", "--out", tmp_path / "s", *EXTRACT, label="special")
    assert o.refusal_problem(f"the file list {tmp_path / 'list.csv'} is a FIFO, not a regular file") is None
    assert not (tmp_path / "s").exists()


def test_a_list_naming_a_device_records_it_as_failed(server, photos, tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    listed = _csv(tmp_path, ["/dev/zero.png", "zero.png", str(sorted(photos.rglob("*.png"))[0])])
    o = server.run("extract", "--data", listed, "--out", tmp_path / "s", *EXTRACT, label="special")
    assert o.success_problem() is None
    index = _index(tmp_path / "s")
    assert index["zero"][0] == "error" and "not a regular file" in index["zero"][1]
    assert index["dev/zero"][0] == "error" and "the file is gone" in index["dev/zero"][1]


# ------------------------------------------------------------------------------------------------ brace patterns
BIG_PATTERNS = ["x{0..999999}.tar", "x{0..9999}{0..9999}.tar", "x{0..9999999999}.tar", "a.tar::b{0..99999}.tar"]


def test_brace_counts_agree_with_braceexpand():
    from braceexpand import braceexpand

    from fdpipe.data.braces import count_names

    for p in ["x{0..9}.tar", "x{0..9}{a,b,{c..e}}y", "{07..10}", "{a..g..2}", "{4..1}", "p{2.{5..7},3.{2,3}}",
              "a{b}c", "a{}c", r"{1\{2,3}", "}{x", "{0..9..3}", "{,.b}", "a{1,{2..4}{x,y}}", "{-3..2}"]:
        assert count_names(p) == len(list(braceexpand(p))), p
    assert [count_names(p) for p in BIG_PATTERNS] == [100_001] * 4  # counting stops past the bound


@pytest.mark.parametrize("pattern", BIG_PATTERNS, ids=["10^6", "10^4x10^4", "10^10", "list"])
def test_a_pattern_of_too_many_shards_is_one_line(server, tmp_path, pattern):
    """Each ran past 60 s building its names before."""
    o = server.run("extract", "--data", tmp_path / pattern, "--out", tmp_path / "s", *EXTRACT, label="braces")
    assert o.refusal_problem("the pattern stands for more than 100,000 shards") is None
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("spec,message", [
    ("/data/x{0..9999999999}.tar", "image source /data/x{0..9999999999}.tar: the pattern stands for more than"),
    ("/", "image source /: that is the file system's root"),  # walked the whole file system before
], ids=["pattern-10^10", "root"])
def test_a_stores_recorded_source_is_held_to_the_same_bounds(server, bases, tmp_path, spec, message):
    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    edit_manifest(_set("data.spec", spec))(store, True)
    o = server.run("distill", "--store", store, "--out", tmp_path / "run", "--view-source", "data", *DISTILL,
                   label="braces")  # the store's own views would need no source at all
    assert o.refusal_problem(message) is None
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -------------------------------------------------------------------------------------------------------- stores
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("rel", ["manifest.draft.json", "_progress/shard-00000.json"], ids=["draft", "marker"])
def test_a_draft_or_marker_nested_deeply_is_one_line(server, bases, tmp_path, rel):
    """RecursionError before."""
    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    (store / "manifest.json").unlink()
    (store / rel).write_text(_nested(100_000))
    o = server.run("store", "ls", store, label="stores")
    assert o.refusal_problem(f"{store / rel} is not valid JSON (nested too deeply)") is None


def test_a_manifest_too_large_is_refused_before_it_is_read(server, bases, tmp_path):
    """300 MB took 2.4 GB to parse before; the size is checked first (a sparse file: nothing is read)."""
    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    with open(store / "manifest.json", "r+b") as f:
        f.truncate(300 << 20)
    o = server.run("store", "info", store, label="stores")
    assert o.refusal_problem(f"{store / 'manifest.json'} has 314,572,800 bytes, more than the 16 MiB a manifest "
                             "may have") is None


def test_a_manifest_just_under_the_bound_stays_under_the_memory_bound(server, bases, tmp_path):
    """The costliest JSON per byte (small nested lists, ~40 bytes of memory each) at the size limit."""
    from fdpipe.store.fs import MAX_JSON_BYTES

    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    item = b"[[[[[]]]]]"
    n = (MAX_JSON_BYTES - 100) // (len(item) + 1)
    (store / "manifest.json").write_bytes(b'{"format": "fdpipe-store", "format_version": 3, "pad": ['
                                          + b",".join([item] * n) + b"]}")
    o = server.run("store", "info", store, label="stores")
    assert o.refusal_problem("checksum mismatch") is None


@pytest.mark.parametrize("index_too", [False, True], ids=["chunks", "chunks-and-index"])
def test_a_zarr_array_without_its_crc32c_is_one_line(server, bases, photos, tmp_path, index_too):
    """verify --deep failed with a reshape error inside zarr before."""
    def drop(meta: dict[str, Any]) -> None:
        config = meta["codecs"][0]["configuration"]
        for key in ("codecs", "index_codecs") if index_too else ("codecs",):
            config[key] = [c for c in config[key] if c["name"] != "crc32c"]

    store = tmp_path / "store"
    shutil.copytree(bases["zarr"], store)
    edit_zarr_metadata(drop)(store, True)
    for name, args in commands(store, tmp_path, "zarr", photos).items():
        if name in ("verify", "verify-deep", "distill"):
            o = server.run(*args, label="stores")
            assert o.refusal_problem("zarr.json: its chunk codecs do not end in the crc32c codec") is None, name


# ------------------------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("text,message", [
    ("path\n{0}\x00x\n", "row 0: the path holds a NUL byte"),  # ValueError from os.stat before
    ("path,path\n{0},{0}\n", "has the column 'path' 2 times; keep one"),  # KeyError from pyarrow before
], ids=["nul-byte", "path-twice"])
def test_a_malformed_list_is_one_line(server, photos, tmp_path, text, message):
    data = tmp_path / "list.csv"
    data.write_text(text.format(sorted(photos.rglob("*.png"))[0]))
    o = server.run("extract", "--data", data, "--out", tmp_path / "s", *EXTRACT, label="sources")
    assert o.refusal_problem(f"{data}") is None and message in o.stderr
    assert not (tmp_path / "s").exists()


LAUGHS = "storage_options:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("args,message", [
    (["store", "info", "s3://bucket/store", "--storage-options", '{"foo": 1}'],
     "--storage-options for s3://bucket/store: 'foo' is not an option of the s3 filesystem"),  # a TypeError before
    (["store", "info", "zip://manifest.json::/etc/passwd"],
     "cannot open zip://manifest.json::/etc/passwd: File is not a zip file"),  # BadZipFile before
    (["extract", "--data", "{photos}", "--out", "http://127.0.0.1:9/store", *EXTRACT],
     "the http filesystem cannot do what http://127.0.0.1:9/store needs"),  # NotImplementedError before
    (["extract", "--data", "{photos}", "--out", "{tmp}/s", "--config", "{tmp}/laughs.yaml", *EXTRACT],
     "laughs.yaml: line 3 uses a YAML alias (*a); fdpipe reads no aliases"),  # ran past 60 s before
], ids=["unknown-storage-option", "zip-of-no-zip", "out-http", "yaml-billion-laughs"])
def test_a_url_or_option_fdpipe_cannot_use_is_one_line(server, photos, tmp_path, args, message):
    (tmp_path / "laughs.yaml").write_text(LAUGHS)
    o = server.run(*(a.replace("{photos}", str(photos)).replace("{tmp}", str(tmp_path)) for a in args),
                   label="sources")
    assert o.refusal_problem(message) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["laughs.yaml"]


# ---------------------------------------------------------------------------------------------- run directories
FINETUNE = ["--data", "{photos}", "--val", "{photos}", "--epochs", "1", "--batch-size", "2", "--workers", "0",
            "--quiet"]


@pytest.fixture(scope="module")
def distill_run(server, bases, photos, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "distilled"
    o = server.run("distill", "--store", bases["zarr"], "--data", photos, "--out", run, *DISTILL, label="run")
    assert o.success_problem() is None
    return run


def _stopped(run: Path, tmp_path: Path) -> Path:
    """A copy of a run that stopped before its model was written: settings.yaml, metrics.jsonl, train_state.pt."""
    out = tmp_path / "stopped"
    shutil.copytree(run, out)
    for name in ("config.json", "student.safetensors", "projector.safetensors", "loss.png"):
        (out / name).unlink(missing_ok=True)
    return out


@pytest.mark.parametrize("case,message", [
    ("init-is-out", "holds --init {out}, which this run would overwrite"),  # overwrote the distill run before
    ("out-is-a-distill-run", "holds a run of fdpipe distill, which fdpipe finetune would overwrite"),
    ("out-is-a-stopped-distill-run", "holds another command's run, which fdpipe finetune would overwrite"),
    ("distill-into-a-store", "holds a feature store, which this run would overwrite"),
], ids=["init-is-out", "out-is-a-distill-run", "out-is-a-stopped-distill-run", "distill-into-a-store"])
def test_a_run_never_overwrites_what_it_did_not_make(server, bases, photos, distill_run, tmp_path, case, message):
    out = distill_run
    if case == "out-is-a-stopped-distill-run":
        out = _stopped(distill_run, tmp_path)
    if case == "distill-into-a-store":
        out = Path(shutil.copytree(bases["zarr"], tmp_path / "store"))
    before = _files(out)
    if case == "distill-into-a-store":
        args = ["distill", "--store", out, "--data", photos, "--out", out, *DISTILL]
    else:
        init = str(distill_run) if case == "init-is-out" else "scratch"
        args = ["finetune", "--init", init, "--out", out, *(a.format(photos=photos) for a in FINETUNE)]
    o = server.run(*args, label="run")
    assert o.refusal_problem(f"--out {out} {message.format(out=out)}; choose a new --out") is None
    assert _files(out) == before


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def _edit_state(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def build(run: Path) -> None:
        import torch

        path = run / "train_state.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.save(change(state), path)

    return build


def _at(epoch: int, sample: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(state: dict[str, Any]) -> dict[str, Any]:
        state["position"] = dict(state["position"], epoch=epoch, sample_in_epoch=sample)
        return state

    return change


class _Code:
    """A pickle that runs a command when unpickled (it writes the file named here)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_with_code(run: Path) -> None:
    import pickle

    (run / "train_state.pt").write_bytes(pickle.dumps({"model": _Code(run.parent / "ran")}))


def _cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def build(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:keep(len(data))])

    return build


def _zeroed(run: Path) -> None:
    path = run / "train_state.pt"
    path.write_bytes(bytes(path.stat().st_size))


def _broken_log_line(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join([lines[0], '{"step": 2, "loss": \n', *lines[1:]]))


@pytest.mark.parametrize("tamper,message", [
    (_cut("train_state.pt", lambda n: n // 2), "train_state.pt is truncated or not a torch checkpoint"),
    (_zeroed, "train_state.pt is truncated or not a torch checkpoint"),
    (_edit_state(lambda s: {}), "train_state.pt lacks model, optimizer, position, rng, fingerprint"),
    (_pickle_with_code, "train_state.pt holds objects other than tensors and plain values"),
    (_edit_state(_at(-5, 0)), "train_state.pt: position is {'epoch': -5"),
    (_edit_state(_at(0, 10**12)), "train_state.pt is at sample 1,000,000,000,000 of epoch 0, which has 4"),
    (_broken_log_line, "metrics.jsonl line 2 is not JSON"),
], ids=["state-truncated", "state-zeroed", "state-empty-dict", "state-pickle-with-code", "state-epoch-minus-5",
        "state-sample-10^12", "metrics-broken-line"])
def test_a_tampered_run_is_refused_by_resume_in_one_line(server, bases, photos, distill_run, tmp_path, tamper,
                                                          message):
    run = _copy(distill_run, tmp_path)
    tamper(run)
    before = _files(run)
    o = server.run("distill", "--store", bases["zarr"], "--data", photos, "--out", run, *DISTILL, "--resume",
                   label="run")
    assert o.refusal_problem(f"{run}/{message}") is None
    assert _files(run) == before and not (tmp_path / "ran").exists()


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(server, bases, photos, distill_run, tmp_path):
    """A crash (or a full disk) while a line is appended leaves it without its newline: it is of a step after the
    last checkpoint, so the resume leaves it out instead of refusing the run."""
    run = _copy(distill_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    o = server.run("distill", "--store", bases["zarr"], "--data", photos, "--out", run, *DISTILL, "--epochs", "2",
                   "--resume", label="run")
    assert o.success_problem() is None
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def _edit_config(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def build(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        change(config)
        (run / "config.json").write_text(json.dumps(config))

    return build


def _header_length(n: int) -> Callable[[Path], None]:
    def build(run: Path) -> None:
        data = (run / "student.safetensors").read_bytes()
        (run / "student.safetensors").write_bytes(n.to_bytes(8, "little") + data[8:])

    return build


def _offsets_past_the_end(run: Path) -> None:
    path = run / "student.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [10**12, 10**12 + end - start]
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("tamper,message", [
    (_edit_config(lambda c: c.update(architecture=5)), "config.json: architecture is 5, not a timm model name"),
    (_edit_config(lambda c: c["model_args"].update(colour="blue")),
     "config.json: model_args has 'colour', which beit_base_patch16_224 does not take"),
    (_edit_config(lambda c: c.update(weights="/etc/passwd")), "config.json: weights is '/etc/passwd', not the name"),
    (_cut("student.safetensors", lambda n: 5000), "student.safetensors is not a whole safetensors file"),
    (_header_length(2**62), "student.safetensors is not a whole safetensors file: its header claims "
                            "4,611,686,018,427,387,904 bytes"),
    (_offsets_past_the_end, "student.safetensors is not a whole safetensors file: tensor"),
], ids=["architecture-5", "model-args-unknown-key", "weights-etc-passwd", "student-truncated",
        "student-header-2^62", "student-offsets-past-end"])
@pytest.mark.parametrize("command", ["finetune", "analyze"])
def test_a_tampered_checkpoint_is_refused_in_one_line(server, photos, distill_run, tmp_path, tamper, message,
                                                      command):
    run = _copy(distill_run, tmp_path)
    tamper(run)
    before = _files(run)
    args = {"finetune": ["finetune", "--init", run, "--out", tmp_path / "ft",
                         *(a.format(photos=photos) for a in FINETUNE)],
            "analyze": ["analyze", run, "--data", photos, "--out", tmp_path / "an", "--images", "2"]}[command]
    o = server.run(*args, label="run")
    assert o.refusal_problem(f"{run}/{message}") is None
    assert _files(run) == before


# ------------------------------------------------------------------------------------------------------- disks
def _spawn(*args: Any, prefix: tuple[str, ...] = (), preexec: Callable[[], None] | None = None) -> Outcome:
    """A command in its own process (for what the fork server cannot give a child: a mount namespace, a limit)."""
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    args = [str(a) for a in args]
    t0 = time.monotonic()
    try:
        r = subprocess.run([*prefix, str(Path(sys.executable).parent / "fdpipe"), *args], capture_output=True,
                           text=True, env=env, timeout=TIMEOUT_S, preexec_fn=preexec)
        return Outcome(args, r.returncode, r.stdout, r.stderr, 0.0, time.monotonic() - t0, False)
    except subprocess.TimeoutExpired as e:
        return Outcome(args, -9, str(e.stdout or ""), str(e.stderr or ""), 0.0, time.monotonic() - t0, True)


_READ_ONLY = ('d=$1; shift; mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" "$d" && exec "$@"',)


def _read_only(folder: Path) -> tuple[str, ...]:
    """The prefix that runs a command with `folder` read-only: a read-only bind mount in a user namespace of its
    own (unshare -rm: no privileges, and root cannot write through it either); where there is none, the folder's
    mode (which stops anyone but root); skip when neither works."""
    probe = ("unshare", "-rm", "sh", "-c", *_READ_ONLY, "sh", str(folder), "sh", "-c", f"! touch {folder}/probe")
    try:
        if shutil.which("unshare") and subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return probe[:5] + ("sh", str(folder))
    except subprocess.TimeoutExpired:
        pass
    if os.geteuid() == 0:
        pytest.skip("no user namespaces for a read-only mount, and root writes through a folder's mode")
    folder.chmod(0o555)
    return ()


@pytest.mark.parametrize("command", ["distill-resume", "finetune"])
def test_a_read_only_out_is_one_line_and_loses_nothing(server, bases, photos, distill_run, tmp_path, command):
    run = _copy(distill_run, tmp_path)
    before = _files(run)
    if command == "distill-resume":
        prefix = _read_only(run)
        args = ["distill", "--store", bases["zarr"], "--data", photos, "--out", run, *DISTILL, "--epochs", "2",
                "--resume"]
        named = run / "metrics.jsonl"  # the resume's first write: the log cut back to the checkpoint
    else:
        (tmp_path / "ro").mkdir()
        prefix = _read_only(tmp_path / "ro")
        args = ["finetune", "--init", run, "--out", tmp_path / "ro" / "ft", *(a.format(photos=photos)
                                                                           for a in FINETUNE)]
        named = tmp_path / "ro" / "ft"
    o = _spawn(*args, prefix=prefix)
    assert o.refusal_problem(f"writing {named}; nothing written before was lost") is None
    for folder in (run, tmp_path / "ro"):  # writable again, where the fallback made it read-only by its mode
        if folder.exists():
            folder.chmod(0o755)
    assert _files(run) == before and not (tmp_path / "ro" / "ft").exists()
    if command == "distill-resume":  # the run goes on from where it was
        assert server.run(*args, label="run").success_problem() is None


def test_a_file_size_limit_while_saving_the_state_loses_nothing(server, bases, photos, distill_run, tmp_path):
    """RLIMIT_FSIZE (ulimit -f) below train_state.pt's size: its write fails with EFBIG at the first checkpoint of
    the resumed run, whose earlier state and student stay as they were; a resume without the limit goes on."""
    import resource

    run = _copy(distill_run, tmp_path)
    before = _files(run)
    limit = (run / "train_state.pt").stat().st_size // 2
    args = ["distill", "--store", bases["zarr"], "--data", photos, "--out", run, *DISTILL, "--epochs", "2", "--resume"]
    o = _spawn(*args, preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert o.refusal_problem(f"file too large (a file-size limit: ulimit -f) writing {run / 'train_state.pt'}; "
                             "nothing written before was lost") is None
    after = _files(run)
    assert set(after) == set(before)  # no temporary file left
    ran = ("metrics.jsonl", "settings.yaml")  # the resumed run's: its settings, the steps it took before the save
    assert {k: v for k, v in after.items() if k not in ran} == {k: v for k, v in before.items() if k not in ran}
    assert server.run(*args, label="run").success_problem() is None
    assert _files(run)["student.safetensors"] != before["student.safetensors"]


@pytest.mark.parametrize("error,message", [
    (OSError(errno.EROFS, "Read-only file system", "/runs/a/metrics.jsonl"),
     "read-only file system writing /runs/a/metrics.jsonl; nothing written before was lost; make it writable"),
    (OSError(errno.EFBIG, "File too large"),
     "file too large (a file-size limit: ulimit -f); nothing written before was lost; raise the limit"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/a"),
     "permission denied on /runs/a; nothing written before was lost; fix the permissions"),
], ids=["erofs", "efbig", "eacces"])
def test_a_refused_write_is_one_line_that_names_the_file(error, message):
    import click
    from click.testing import CliRunner

    from fdpipe.options import Group

    @click.group(cls=Group)
    def group() -> None:
        pass

    @group.command()
    def write() -> None:
        raise error

    r = CliRunner().invoke(group, ["write"])
    one_line_error(r, message)


# ------------------------------------------------------------------------------------------------- small ones
def test_a_full_disk_names_the_file_or_nothing_never_empty_brackets():
    import click
    from click.testing import CliRunner

    from fdpipe.options import Group

    @click.group(cls=Group)
    def group() -> None:
        pass

    @group.command()
    @click.option("--name", default=None)
    def write(name: str | None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", name)

    r = CliRunner().invoke(group, ["write"])
    assert r.exit_code == 1 and "()" not in r.output and "no space left on device; free space" in r.output
    r = CliRunner().invoke(group, ["write", "--name", "/data/x.tar"])
    assert r.exit_code == 1 and "no space left on device writing /data/x.tar" in r.output


def test_rerunning_convert_or_merge_on_its_finished_destination_succeeds(cli, tmp_path):
    """As a rerun extract does (issue 16 defect 11); a complete DST of other settings is still refused."""
    a, b = _synthetic(tmp_path, "a"), _synthetic(tmp_path, "b", key_prefix="b/", n=7)
    for args in (["convert", a, tmp_path / "c", "--format", "wds"], ["merge", a, b, tmp_path / "m"]):
        assert cli("store", *args).exit_code == 0
        r = cli("store", *args)
        assert r.exit_code == 0 and "resumed:" in r.output and "ok:" in r.output, r.output
    r = cli("store", "convert", b, tmp_path / "c", "--format", "wds")
    assert r.exit_code == 1 and "was made with other settings" in r.output, r.output


def test_the_format_document_says_links_are_refused_as_the_readers_do():
    """The readers refuse a link member (zoo: tar-symlink-member); the format document says so."""
    text = " ".join((Path(__file__).parents[1] / "docs" / "store-format.md").read_text().split())
    assert "readers must refuse any other member (a link, a device, a directory, `/x` or `../x`), as fdpipe does" in text
