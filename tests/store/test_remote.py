"""Remote stores on a real S3 endpoint on loopback (moto's server): extract, distill, crash safety, the read cache,
store commands, and one clear line for bad credentials, missing buckets and unreachable endpoints."""

from __future__ import annotations

import collections
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error, shard_rows, store_settings, whitened, write_store
from fdpipe.store import StoreWriter, open_store, shard_range
from fdpipe.store.fs import effective_options

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


class RequestLog:
    """Every request the server answers, as (method, path, query), so tests can count downloads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []

    def wrap(self, app):
        def counted(environ, start_response):
            with self.lock:
                self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                      environ.get("QUERY_STRING", "")))
            return app(environ, start_response)

        return counted

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def gets(self, contains: str) -> collections.Counter:
        """GetObject requests (object downloads, not listings) per path containing `contains`."""
        with self.lock:
            return collections.Counter(p for m, p, q in self.requests if m == "GET" and contains in p
                                       and "list-type" not in q)


@pytest.fixture(scope="module")
def s3_server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    log = RequestLog()
    server._server.app = log.wrap(server._server.app)  # werkzeug looks the app up per request
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}", log
    server.stop()


@dataclass
class S3:
    endpoint: str
    bucket: str
    options: dict
    log: RequestLog

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    @property
    def options_json(self) -> str:
        return json.dumps(self.options)

    @property
    def fs(self):
        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True, use_listings_cache=False)

    def keys(self, name: str) -> dict[str, bytes]:
        """{relative key: bytes} of every object under s3://bucket/name."""
        fs, prefix = self.fs, f"{self.bucket}/{name}/"
        return {p[len(prefix):]: fs.cat_file(p) for p in fs.find(prefix)}


@pytest.fixture
def s3(s3_server):
    endpoint, log = s3_server
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    bucket = f"fdpipe-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
    log.clear()
    return S3(endpoint, bucket, options, log)


def local_files(root) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def without_manifest(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != "manifest.json"}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from conftest import write_photos as photos

    return photos(tmp_path_factory.mktemp("photos"))


EXTRACT = ["--teacher", "effnet-lite0", "--views", 2, "--image-size", 32, "--shard-size", 2, "--workers", 0, "--quiet"]
DISTILL = ["--epochs", 1, "--batch-size", 2, "--workers", 0, "--max-steps", 3, "--quiet"]


# ----------------------------------------------------------------------------------- extract and distill on s3
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_extract_to_s3_then_distill_from_it_equals_the_local_run(cli, s3, photo_dir, tmp_path, layout):
    local, remote = tmp_path / "store", s3.url("store")
    so = ["--storage-options", s3.options_json]
    assert cli("extract", *EXTRACT, "--format", layout, "--data", photo_dir, "--out", local).exit_code == 0
    r = cli("extract", *EXTRACT, "--format", layout, "--data", photo_dir, "--out", remote, *so)
    assert r.exit_code == 0, r.output
    assert open_store(remote, s3.options).fingerprint == open_store(str(local)).fingerprint
    assert without_manifest(s3.keys("store")) == without_manifest(local_files(local))
    assert cli("store", "verify", remote, *so).exit_code == 0
    r = cli("distill", "--store", local, "--out", tmp_path / "run-local", *DISTILL)
    assert r.exit_code == 0, r.output
    r = cli("distill", "--store", remote, "--out", tmp_path / "run-s3", *DISTILL, *so)
    assert r.exit_code == 0, r.output
    a, b = losses(tmp_path / "run-local"), losses(tmp_path / "run-s3")
    assert len(a) == 3 and a == b


@pytest.mark.slow
def test_wds_cache_makes_later_epochs_download_nothing(cli, s3, photo_dir, tmp_path):
    remote, so = s3.url("store"), ["--storage-options", s3.options_json]
    assert cli("extract", *EXTRACT, "--format", "wds", "--data", photo_dir, "--out", remote, *so).exit_code == 0
    tars = [k for k in s3.keys("store") if k.startswith("wds/")]
    assert len(tars) == 6  # 3 shards x 2 views: an epoch reads one view's tar of each shard
    args = ["--store", remote, "--epochs", 2, "--batch-size", 2, "--workers", 0, "--quiet", *so]

    s3.log.clear()  # without a cache, every epoch downloads every shard again
    assert cli("distill", *args, "--out", tmp_path / "nocache").exit_code == 0
    assert len(losses(tmp_path / "nocache")) == 6  # two epochs of 3 steps
    assert sum(s3.log.gets("/wds/").values()) == 6  # 3 tars an epoch, each downloaded when read

    cache = tmp_path / "cache"
    s3.log.clear()  # with it, each shard is downloaded once: the second epoch downloads nothing
    assert cli("distill", *args, "--out", tmp_path / "cached", "--cache-dir", cache).exit_code == 0
    gets = s3.log.gets("/wds/")
    assert 3 <= len(gets) and all(n == 1 for n in gets.values())  # each tar read is downloaded once
    assert all(n == 1 for n in s3.log.gets("/index/").values())  # if read at all
    assert losses(tmp_path / "cached") == losses(tmp_path / "nocache")

    s3.log.clear()  # DataLoader workers, forked afresh each epoch, fill and share the cache the same way
    r = cli("distill", "--store", remote, "--epochs", 2, "--batch-size", 2, "--workers", 2, "--quiet", *so,
            "--out", tmp_path / "workers", "--cache-dir", tmp_path / "cache2")
    assert r.exit_code == 0, r.output
    gets = s3.log.gets("/wds/")
    assert 3 <= len(gets) and all(n == 1 for n in gets.values())
    assert s3.log.gets("/manifest.json")  # the manifest is always read afresh


def test_a_cut_off_download_in_the_cache_is_fetched_again(s3, tmp_path):
    settings = store_settings("wds", "int8", n=4, s=2)
    targets = whitened(np.random.default_rng(0), (4, 2, 4, 8))
    url = s3.url("s")
    w = StoreWriter(url, settings, s3.options)
    w.open()
    for shard in range(w.num_shards):
        a, b = shard_range(shard, w.s, w.n)
        w.write_stored(shard, *w.q.quantize(targets[a:b]), shard_rows(settings, shard))
    assert w.try_finalize()
    cache = tmp_path / "cache"
    want = np.stack([it.targets for it in open_store(url, s3.options).iter_images()])
    got = np.stack([it.targets for it in open_store(url, s3.options, cache_dir=str(cache)).iter_images()])
    assert np.array_equal(want, got)
    cached = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 2000]
    assert cached
    for p in cached:  # as if a crash had cut every download short
        p.write_bytes(p.read_bytes()[:1000])
    s3.log.clear()
    again = np.stack([it.targets for it in open_store(url, s3.options, cache_dir=str(cache)).iter_images()])
    assert np.array_equal(want, again)
    assert len(s3.log.gets("/wds/")) == 4  # 2 shards x 2 view tars, each fetched again


def test_a_location_survives_pickling_and_forking(s3):
    import os
    import pickle

    from fdpipe.store.fs import StoreLocation

    loc = StoreLocation(s3.url("p"), s3.options)
    loc.put_atomic("a/b.json", b"{}")
    assert pickle.loads(pickle.dumps(loc)).read_bytes("a/b.json") == b"{}"
    pid = os.fork()
    if pid == 0:  # the child must not reuse the parent's event loop (s3fs is not fork-safe)
        os._exit(0 if loc.read_bytes("a/b.json") == b"{}" else 1)
    assert os.waitpid(pid, 0)[1] == 0


# -------------------------------------------------------------------------------------------- crash safety
@pytest.fixture(scope="module")
def reference_stores(photo_dir, tmp_path_factory):
    """Uninterrupted local extractions (in a subprocess, like the crashed runs), one per layout, made once."""
    from conftest import extract_cmd

    made: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in made:
            made[layout] = tmp_path_factory.mktemp("ref") / layout
            subprocess.run(extract_cmd(photo_dir, made[layout], "--format", layout), check=True)
        return made[layout]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout,when,target", [
    ("zarr", "mid-write", "targets/c/2/"),          # half of a shard's zarr file uploaded to its temporary key
    ("wds", "mid-write", "index/part-00002"),
    ("wds", "after-commit", "wds/view-01/shard-000001"),  # a shard's tars in place, its index and marker not yet
])
def test_sigkill_during_an_s3_extract_then_rerun_gives_the_uninterrupted_store(cli, s3, photo_dir, reference_stores,
                                                                               layout, when, target):
    from conftest import KILLER, extract_cmd

    ref = reference_stores(layout)
    remote = s3.url("crashed")
    # one commit thread: shards commit in order, so the shards before the killed one are committed at the kill
    cmd = extract_cmd(photo_dir, remote, "--format", layout, "--storage-options", s3.options_json,
                       "--commit-workers", "1")
    p = subprocess.run([sys.executable, "-c", KILLER, when, target, *cmd[1:]], capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]

    after_crash = s3.keys("crashed")
    reference = local_files(ref)
    visible = {k: v for k, v in after_crash.items() if not k.rpartition("/")[2].startswith(".tmp-")}
    assert "manifest.json" not in visible
    for key, data in visible.items():  # whatever is under a final key is complete: byte for byte the reference
        assert data == reference[key], key
    if when == "mid-write":
        assert not [k for k in visible if target in k]  # the half-written file exists only under a temporary key
        assert [k for k in after_crash if target.rpartition("/")[0] in k and ".tmp-" in k]

    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "resumed:" in p.stdout
    v = cli("store", "verify", "--deep", remote, "--storage-options", s3.options_json)
    assert v.exit_code == 0, v.output
    assert open_store(remote, s3.options).fingerprint == open_store(str(ref)).fingerprint
    final = s3.keys("crashed")  # the same keys as the uninterrupted store: debris of the crash is gone
    assert sorted(final) == sorted(reference)
    assert without_manifest(final) == without_manifest(reference)


# ------------------------------------------------------------------------------------------ store commands
def test_store_commands_work_on_s3(cli, s3, make_store, tmp_path):
    url, _, _ = make_store("zarr", "int8", n=5, s=2)
    so = ["--storage-options", s3.options_json]
    r = cli("store", "convert", url, s3.url("w"), "--format", "wds", *so)
    assert r.exit_code == 0, r.output
    info = json.loads(cli("store", "info", "--json", s3.url("w"), *so).output)
    assert (info["layout"], info["images"]) == ("wds", 5)
    ls = json.loads(cli("store", "ls", "--json", s3.url("w"), *so).output)
    assert [s["status"] for s in ls["shards"]] == ["ok"] * 3
    assert cli("store", "verify", "--deep", s3.url("w"), *so, "--cache-dir", tmp_path / "c").exit_code == 0
    back = tmp_path / "back"
    assert cli("store", "convert", s3.url("w"), back, "--format", "zarr", *so).exit_code == 0
    assert open_store(str(back)).fingerprint == open_store(url).fingerprint
    assert without_manifest(local_files(back)) == without_manifest(local_files(url))
    r = cli("store", "convert", url, s3.url("w"), "--format", "wds", *so)  # a finished DST: a rerun succeeds
    assert r.exit_code == 0 and "resumed: 3 of 3 shards" in r.output


def test_merge_on_s3_and_storage_options_from_the_environment(cli, s3, tmp_path, monkeypatch):
    from conftest import part_store

    full = store_settings("wds", "float16", n=5, s=2)
    targets = whitened(np.random.default_rng(1), (5, 2, 4, 8))
    one = str(tmp_path / "one")
    write_store(one, full, targets)
    part_store(str(tmp_path / "a"), full, targets, 0, 3, 2, "wds", "float16")
    part_store(str(tmp_path / "b"), full, targets, 3, 5, 2, "wds", "float16")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # s3fs reads credentials and the endpoint from the env too
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    r = cli("store", "merge", tmp_path / "a", tmp_path / "b", s3.url("m"))
    assert r.exit_code == 0, r.output
    assert open_store(s3.url("m")).fingerprint == open_store(one).fingerprint
    assert without_manifest(s3.keys("m")) == without_manifest(local_files(one))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def iam_auth():
    """Make the server check credentials (moto accepts any by default); the test's own keys are then unknown."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0
    yield
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = before


def test_wrong_credentials_are_one_line(cli, s3, make_store, tmp_path, iam_auth):
    url, _, _ = make_store()
    so = json.dumps({**s3.options, "key": "wrong", "secret": "wrong"})
    for args in (["store", "info", s3.url("s")], ["store", "ls", s3.url("s")],
                 ["store", "convert", url, s3.url("c"), "--format", "wds"],
                 ["distill", "--store", s3.url("s"), "--out", tmp_path / "run"]):
        out = one_line_error(cli(*args, "--storage-options", so))
        assert f"access denied to s3://{s3.bucket}/" in out and "check the credentials" in out, out


def test_a_bucket_that_does_not_exist_is_one_line(cli, s3, make_store, photo_dir):
    url, _, _ = make_store()
    so = ["--storage-options", s3.options_json]
    for args in (["store", "info", "s3://no-such-bucket/s"], ["store", "verify", "s3://no-such-bucket/s"],
                 ["store", "convert", url, "s3://no-such-bucket/c", "--format", "wds"],
                 ["extract", *EXTRACT, "--data", photo_dir, "--out", "s3://no-such-bucket/s"]):
        out = one_line_error(cli(*args, *so))
        assert "bucket 'no-such-bucket' does not exist" in out and "create it or fix the URL" in out, out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_fails_fast_in_one_line(cli):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    so = json.dumps({"key": "x", "secret": "y", "client_kwargs": {"endpoint_url": endpoint}})  # default timeouts
    t0 = time.time()
    out = one_line_error(cli("store", "info", "s3://bucket/store", "--storage-options", so))
    assert time.time() - t0 < 20
    assert f"cannot reach {endpoint} for s3://bucket/store" in out and "check the endpoint URL" in out


@pytest.mark.slow
def test_a_server_that_never_answers_fails_within_the_timeouts(cli):
    with socket.socket() as silent:  # accepts connections (backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        so = json.dumps({"key": "x", "secret": "y", "client_kwargs": {"endpoint_url": endpoint},
                         "config_kwargs": {"connect_timeout": 1, "read_timeout": 1}})
        t0 = time.time()
        out = one_line_error(cli("store", "verify", "s3://bucket/store", "--storage-options", so))
        assert time.time() - t0 < 30
    assert f"cannot reach {endpoint}" in out


def test_default_timeouts_and_retries_are_bounded_and_overridable():
    so = effective_options("s3://b/x", {"config_kwargs": {"read_timeout": 3}, "key": "k"})
    assert so["config_kwargs"] == {"connect_timeout": 5, "read_timeout": 3,
                                   "retries": {"max_attempts": 2, "mode": "standard"}}
    assert so["key"] == "k" and so["use_listings_cache"] is False
    assert effective_options("/local/path", {"x": 1}) == {"x": 1}


# ------------------------------------------------------------------------------------------ a stalled endpoint
STALLER = """
import os, signal, sys
from fdpipe.store import fs
server, target = int(sys.argv[1]), sys.argv[2]
orig = fs.StoreLocation.put_atomic
def put_atomic(self, rel, data):
    if target in rel:
        os.kill(server, signal.SIGSTOP)  # the endpoint stops answering just as this upload starts
    return orig(self, rel, data)
fs.StoreLocation.put_atomic = put_atomic
from fdpipe.cli import main
main(sys.argv[3:])
"""


@pytest.fixture
def stoppable_s3():
    """A moto server in its own process, so that it can be stopped (SIGSTOP) and resumed (SIGCONT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    deadline = time.time() + 30
    while True:
        try:
            s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("stall")
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                server.kill()
                raise
            time.sleep(0.2)
    fast = {**options, "call_timeout": 5, "config_kwargs": {"connect_timeout": 2, "read_timeout": 2}}
    yield server, endpoint, fast
    server.send_signal(signal.SIGCONT)
    server.kill()
    server.wait()


@pytest.mark.slow
def test_a_stalled_endpoint_stops_extract_and_distill_in_one_line_and_a_rerun_resumes(cli, stoppable_s3, photo_dir,
                                                                                      reference_stores):
    from conftest import extract_cmd

    server, endpoint, so = stoppable_s3
    remote = "s3://stall/store"
    cmd = extract_cmd(photo_dir, remote, "--format", "wds", "--storage-options", json.dumps(so),
                       "--commit-workers", "1")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", STALLER, str(server.pid), "index/part-00001", *cmd[1:]],
                       capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"cannot reach {endpoint}" in lines[0] and "rerun the same command to resume" in lines[0], lines[0]
    assert took < 60, took  # the 5 s call_timeout, plus extraction itself
    server.send_signal(signal.SIGCONT)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "resumed:" in p.stdout, p.stderr[-2000:]
    assert open_store(remote, so).fingerprint == open_store(str(reference_stores("wds"))).fingerprint

    server.send_signal(signal.SIGSTOP)
    t0 = time.time()
    r = subprocess.run([str(Path(sys.executable).parent / "fdpipe"), "distill", "--store", remote,
                        "--storage-options", json.dumps(so), "--out", str(photo_dir.parent / "run"), *map(str, DISTILL)],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and f"cannot reach {endpoint}" in lines[0], r.stderr[-2000:]
    assert time.time() - t0 < 60
