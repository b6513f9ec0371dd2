"""A usage error answers at once: options and local paths are checked before torch, timm, torchvision, zarr or
pyarrow load (seconds and most of a GiB), and a command imports only what it uses.

The real guard is the import check: no heavy module in sys.modules after the settings and the path checks. The time
bound on the console script is a generous smoke check (about 0.1-0.5 s measured on 2 cores; 3 s allowed).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
HEAVY = ("torch", "torchvision", "timm", "zarr", "pyarrow", "webdataset")
LIMIT_S = 3.0

# (arguments, exit code, a piece of the one error line)
USAGE_ERRORS = [
    (["distill", "--store", "S", "--out", "{tmp}/r", "--batch-size", "0"], 1, "--batch-size must be at least 1"),
    (["extract", "--teacher", "clip-b", "--data", "/nonexistent", "--out", "{tmp}/o"], 1,
     "no images at /nonexistent: the path does not exist"),
    (["finetune", "--init", "scratch", "--data", "fashion-mnist", "--out", "{tmp}/f", "--min-crop", "0"], 1,
     "--min-crop must be in (0, 1]"),
    (["finetune", "--init", "scratch", "--data", "{tmp}/missing", "--out", "{tmp}/f"], 1, "no images at"),
    (["analyze", "clip-b", "--data", "fashion-mnist", "--out", "{tmp}/a", "--images", "0"], 1,
     "--images must be at least 1"),
    (["distill", "--store", "{tmp}/missing", "--out", "{tmp}/r"], 1, "no store at"),
    (["store", "info", "{tmp}/missing"], 1, "no store at"),
    (["extract", "--teacher", "clip-b", "--data", "{tmp}", "--out", "{tmp}/o", "--format", "wds", "--codec", "zstd-1"],
     1, "--codec zstd-1 is for zarr stores"),  # a layout's facts come from the layout table, which loads no zarr
    (["extract", "--teacher", "clip-b", "--data", "{tmp}", "--out", "{tmp}/o", "--embed-images"], 1,
     "--embed-images needs --format wds"),
    (["distill", "--no-such-option"], 2, "No such option '--no-such-option'"),
]


def _args(args: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in args]


@pytest.mark.parametrize(("args", "code", "message"), USAGE_ERRORS, ids=[f"{a[0]}: {m}" for a, _, m in USAGE_ERRORS])
def test_a_usage_error_is_one_line_within_seconds(tmp_path, args, code, message):
    t0 = time.perf_counter()
    p = subprocess.run([str(BIN / "fdpipe"), *_args(args, tmp_path)], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert p.returncode == code, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    if code == 1:  # an FdpipeError is the one line alone (click's usage errors add the Usage/Try lines)
        assert p.stderr.strip() == errors[0]
    assert seconds < LIMIT_S, f"{' '.join(args)}: {seconds:.2f} s to the error line"


def test_settings_and_usage_errors_load_no_heavy_module(tmp_path):
    """Every stage's settings built (their checks run, the plan's included), then each usage error above run
    in-process: torch and the rest are still not imported."""
    cases = [_args(args, tmp_path) for args, _, _ in USAGE_ERRORS]
    code = f"""
import sys
from fdpipe.analyze.settings import AnalyzeConfig
from fdpipe.distill.settings import DistillConfig
from fdpipe.extract.settings import ExtractConfig
from fdpipe.finetune.settings import FinetuneConfig
from fdpipe.cli import main

ExtractConfig(teacher="t", data="d", out="o")
DistillConfig(store="S", out="o")
DistillConfig(teacher="t", data="d", out="o", views=4, crop_scale=(0.2, 1.0))
FinetuneConfig(init="scratch", data="d", out="o")
AnalyzeConfig(checkpoints=("a",), data="d", out="o")
for args in {cases!r}:
    try:
        main(args, standalone_mode=True)
    except SystemExit as e:
        assert e.code in (1, 2), (args, e.code)
    else:
        raise AssertionError(f"{{args}} did not fail")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
assert not heavy, heavy[:10]
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
