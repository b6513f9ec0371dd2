"""fdpipe demo --quick: every stage leaves its artifacts, and a second run reuses them."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from click.testing import CliRunner

    from fdpipe.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--workers", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_quick_demo_prints_each_command_before_running_it(demo_run):
    _, output = demo_run
    for cmd in ("$ fdpipe extract", "$ fdpipe store verify", "$ fdpipe distill", "$ fdpipe finetune --init"):
        assert cmd in output
    assert output.index("$ fdpipe extract") < output.index("$ fdpipe distill") < output.index("$ fdpipe finetune")


def test_quick_demo_store_verifies(demo_run, cli):
    out, _ = demo_run
    assert cli("store", "verify", "--deep", out / "store").exit_code == 0


@pytest.mark.parametrize("run,weights", [("distill", "student.safetensors"), ("finetune-fd", "model.safetensors"),
                                         ("finetune-scratch", "model.safetensors")])
def test_quick_demo_checkpoints_load_in_plain_timm(demo_run, run, weights):
    out, _ = demo_run
    code = f"""
import json, sys, timm, torch
cfg = json.load(open({str(out / run / 'config.json')!r}))
m = timm.create_model(cfg["architecture"], pretrained=True,
                      pretrained_cfg_overlay=dict(file={str(out / run / weights)!r}), **cfg["model_args"])
size = cfg["pretrained_cfg"]["input_size"][-1]
assert "fdpipe" not in sys.modules
print(tuple(m.eval()(torch.zeros(1, 3, size, size)).shape))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == ("(1, 192)" if run == "distill" else "(1, 10)")


def test_quick_demo_report_has_both_rows(demo_run):
    out, output = demo_run
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| FD") or line.startswith("| scratch")]
    assert len(rows) == 2 and all("%" in r for r in rows)
    for png in ("distill/loss.png", "finetune-fd/accuracy.png", "finetune-scratch/accuracy.png"):
        assert png in report and (out / png).exists()
    assert "FD - scratch:" in output


def test_second_run_reuses_what_is_there(demo_run):
    from click.testing import CliRunner

    from fdpipe.cli import main

    out, _ = demo_run
    before = (out / "store" / "manifest.json").stat().st_mtime_ns
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--workers", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for stage in ("store", "distill", "finetune-fd", "finetune-scratch"):
        assert f"already done, reusing it: {out / stage}" in r.output
    assert "$ fdpipe extract" not in r.output and "$ fdpipe distill" not in r.output
    assert "$ fdpipe finetune" not in r.output
    assert (out / "store" / "manifest.json").stat().st_mtime_ns == before


def test_reuse_refuses_a_stage_made_by_other_settings(demo_run, tmp_path, monkeypatch):
    import shutil

    from click.testing import CliRunner

    from fdpipe import demo
    from fdpipe.cli import main

    out = tmp_path / "copy"
    shutil.copytree(demo_run[0], out)
    monkeypatch.setattr(demo, "QUICK", dataclasses.replace(demo.QUICK, pool=demo.QUICK.pool + 1))
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--workers", "0"])
    assert r.exit_code == 1 and f"{out / 'store'} was made by other demo settings" in r.output
    assert "Traceback" not in r.output and (out / "store" / "manifest.json").exists()  # nothing deleted


def test_the_seed_and_dtype_reach_the_stages_so_a_demo_of_another_seed_is_not_reused(demo_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from fdpipe.cli import main
    from fdpipe.demo import QUICK, stage_commands

    commands = stage_commands(tmp_path, dataclasses.replace(QUICK, seed=7))
    assert all(c[c.index("--seed") + 1] == "7" for c in commands.values())
    assert "--dtype" not in commands["extract"]  # float16: the commands of earlier demos, so they are reused
    int4 = stage_commands(tmp_path, dataclasses.replace(QUICK, dtype="int4"))["extract"]
    assert int4[int4.index("--dtype") + 1] == "int4"
    assert all("--target-space" not in c for c in commands.values())  # features: earlier demos' commands
    coef = stage_commands(tmp_path, dataclasses.replace(QUICK, dtype="pca-32", target_space="coefficients"))
    assert [n for n, c in coef.items() if "--target-space" in c] == ["distill"]  # the head, not the fine-tune
    assert coef["distill"][coef["distill"].index("--target-space") + 1] == "coefficients"
    out = tmp_path / "copy"
    shutil.copytree(demo_run[0], out)
    r = CliRunner().invoke(main, ["demo", "--quick", "--seed", "1", "--out", str(out), "--workers", "0"])
    assert r.exit_code == 1 and f"{out / 'store'} was made by other demo settings" in r.output


TWO = "effnet-lite0,effnet-lite2"


@pytest.fixture(scope="module")
def two_teacher_demo(tmp_path_factory):
    from click.testing import CliRunner

    from fdpipe.cli import main

    out = tmp_path_factory.mktemp("demo2") / "out"
    r = CliRunner().invoke(main, ["demo", "--quick", "--teachers", TWO, "--out", str(out), "--workers", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_a_two_teacher_demo_fills_a_store_per_teacher_in_one_extraction(two_teacher_demo, cli):
    out, output = two_teacher_demo
    assert output.count("$ fdpipe extract") == 1
    assert "$ fdpipe extract --teacher effnet-lite0 --teacher effnet-lite2" in output
    for teacher in TWO.split(","):
        assert cli("store", "verify", out / "stores" / teacher).exit_code == 0
    assert not (out / "store").exists()


def test_a_two_teacher_demo_reports_the_two_teacher_student_beside_the_single_one(two_teacher_demo):
    out, output = two_teacher_demo
    report = (out / "report.md").read_text()
    rows = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| FD") or
            line.startswith("| scratch")]
    assert rows == ["| FD (distilled from effnet-lite0, then fine-tuned)",
                    "| FD (distilled from effnet-lite0 + effnet-lite2, then fine-tuned)", "| scratch"]
    assert "effnet-lite0 + effnet-lite2 - scratch:" in output
    logged = [json.loads(line) for line in (out / "distill-multi" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss/effnet-lite0", "loss/effnet-lite2"} <= r.keys() for r in logged if r.get("kind") == "train")
    for teacher in TWO.split(","):
        assert (out / "distill-multi" / "heads" / f"projector-{teacher}.safetensors").exists()
    for png in ("distill-multi/loss.png", "finetune-multi/accuracy.png"):
        assert png in report and (out / png).exists()


@pytest.mark.parametrize("value,message", [("effnet-lite0,clip-l", "clip-l is not a demo teacher"),
                                           ("effnet-lite2,effnet-lite2", "names a teacher twice"),
                                           (",", "nothing is not a demo teacher")])
def test_demo_teachers_must_be_known_and_named_once(cli, tmp_path, value, message):
    r = cli("demo", "--quick", "--teachers", value, "--out", tmp_path / "out")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_quick_demo_store_holds_the_students_views_and_distill_reads_them(demo_run):
    from fdpipe.store import open_store

    out, _ = demo_run
    views = open_store(str(out / "store")).student_views
    assert views is not None and views.size == 32  # --student-views auto: the quick student's size
    cfg = json.loads((out / "distill" / "config.json").read_text())
    assert cfg["fdpipe"]["pixels"].startswith("student views: the store's own")


def test_compare_sources_adds_a_student_from_the_source_images_and_reports_the_gap(demo_run):
    from click.testing import CliRunner

    from fdpipe.cli import main
    from fdpipe.demo import QUICK, stage_commands

    out, _ = demo_run
    plain, compared = stage_commands(out, QUICK), stage_commands(out, QUICK, compare_sources=True)
    assert {k: v for k, v in compared.items() if k in plain} == plain  # the demo's own stages are reused as they are
    source = compared["distill_source"]
    assert source[source.index("--view-source") + 1] == "data"
    assert [a for a in source if a not in ("--view-source", "data")][:-1] == plain["distill"][:-1]
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--workers", "0", "--compare-sources"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"already done, reusing it: {out / 'distill'}" in r.output and "$ fdpipe distill" in r.output
    report = (out / "report.md").read_text()
    assert "| FD, views cut from the source images" in report
    cfg = json.loads((out / "distill-source" / "config.json").read_text())
    assert cfg["fdpipe"]["pixels"].startswith("student views: cropped from the source images")
    assert "stored views - views cut from the source images:" in r.output


def test_the_frontier_reads_a_demos_store_bytes_and_top1(demo_run):
    """bench/bytes.py's frontier table from a finished demo folder: the point, its bytes and its top-1."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.bytes import frontier
    from fdpipe.store import open_store

    out, _ = demo_run
    f = frontier([str(out)])
    point = f["points"]["float16 x 2 views"]
    st = open_store(str(out / "store"))
    assert point["target_bytes_per_view"] == 2 * int(np.prod(st.target_shape))
    assert point["bytes_per_image"] == 2 * point["target_bytes_per_view"]
    top1 = json.loads((out / "finetune-fd" / "metrics.json").read_text())["final"]["top1"]
    assert point["top1"] == [top1] and point["seeds"] == [0] and point["within_float16_spread"] is None
