"""bench/: every script runs end to end in --smoke mode and writes JSON with its ratio and goal.

Only the shape of the results is checked, never a time: the numbers of a smoke run on a shared machine mean nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common, timing  # noqa: E402
from bench.run_all import BENCHES  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-m", "bench.run_all", "--smoke", "--device", "cpu", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return out, p


def test_run_all_smoke_succeeds_and_summarizes(smoke_results):
    out, p = smoke_results
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["benchmarks"]) == set(BENCHES)
    assert all(b["ok"] for b in summary["benchmarks"].values())
    assert "fdpipe benchmarks (smoke)" in p.stdout
    assert (out / "summary.md").read_text().startswith("| benchmark | ratio | goal | met |")


@pytest.mark.parametrize("name", BENCHES)
def test_each_script_writes_its_ratio_and_goal(smoke_results, name):
    out, _ = smoke_results
    res = json.loads((out / f"{name}.json").read_text())
    assert res["bench"] == name and res["smoke"] is True
    assert isinstance(res["ratio"], float) and res["ratio"] > 0
    g = res["goal"]
    assert isinstance(g["text"], str) and g["text"]
    assert isinstance(g["threshold"], (int, float)) and isinstance(g["met"], bool)
    assert res["table"]["headers"] and res["table"]["rows"]
    m = res["machine"]
    assert m["torch"] and m["cpus"] and m["date"] and m["device"] == "cpu"
    if not g["met"]:
        assert res["bottleneck"]["summary"]


def test_extra_fields_each_script_promises(smoke_results):
    out, _ = smoke_results
    r = {n: json.loads((out / f"{n}.json").read_text()) for n in BENCHES}
    c = r["cached_vs_online"]
    assert c["flop_bound"] > 1 and c["time_bound"] > 1
    assert c["flops"]["teacher_forward_per_image"] > 0 and c["flops"]["student_step_per_image"] > 0
    assert c["first_step_loss_equal"]  # cached and online train on the same targets
    assert set(r["read_overhead"]["steps_per_s"]) == {"memory", "zarr", "wds"}
    assert r["extract_overhead"]["teacher_tflops"] > 0
    s = r["storage"]
    for src in s["sources"].values():
        assert {"float16", "int8"} <= set(src["quantizers"])
        for q in src["quantizers"].values():
            assert 0.99 < q["cos_mean"] <= 1.0 + 1e-6 and q["rel_mse"] >= 0
            assert q["codecs"]["zstd-0 (zarr default)"]["ratio"] > 0
    assert s["codec_recommended"] in s["codec_totals"]
    assert set(s["distill_loss"]) >= {"float32", "float16", "int8"}
    mem = r["memory"]["layouts"]["zarr"]["sizes"]
    assert set(mem) == {"1", "4"} and mem["4"]["images"] == 4 * mem["1"]["images"]
    assert all(v["peak_main_mb"] > 0 for v in mem.values())


def test_alternate_runs_abba_and_table_formats():
    calls = []
    got = timing.alternate({"a": lambda r: calls.append(("a", r)) or r, "b": lambda r: calls.append(("b", r)) or -r}, 3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert got == {"a": [0, 1, 2], "b": [0, -1, -2]}
    assert timing.pair_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert timing.median([3.0, float("nan"), 1.0]) == 2.0
    text = common.table(["x", "y"], [["a", 1.23456], ["bb", 12345]])
    assert "1.23" in text and "12,345" in text


def test_profile_top_names_the_hot_function():
    def hot():
        return sum(i * i for i in range(200_000))

    rows = timing.profile_top(hot, n=5)
    assert rows and all({"function", "calls", "tottime_s", "share_of_total"} <= set(r) for r in rows)
    assert any("hot" in r["function"] or "genexpr" in r["function"] for r in rows)
