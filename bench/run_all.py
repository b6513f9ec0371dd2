"""Run every benchmark (each in its own process), then print and write the summary: one line per benchmark with
its ratio, its goal and whether it was met. `make bench` runs this.

    python -m bench.run_all [--device cuda] [--smoke] [--only read_overhead,storage] [--out bench/results]

Writes <out>/NAME.json per benchmark and <out>/summary.json + summary.md. Exits 1 when a script fails (not when a
goal is missed: a missed goal is a finding, recorded with its bottleneck).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS, ROOT, fmt, table

BENCHES = ("cached_vs_online", "read_overhead", "extract_overhead", "storage", "memory", "ceilings", "multi_teacher",
           "scale", "peers", "bytes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every benchmark")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark [none; smoke 600]")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    timeout = args.timeout or (600 if args.smoke else None)

    status = {}
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", "--device", args.device, "--out", str(out)]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--workers", str(args.workers)] if args.workers is not None else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        stale = out / f"{name}.json"
        stale.unlink(missing_ok=True)
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        status[name] = {"rc": rc, "seconds": round(time.time() - t0, 1)}

    rows, summary = [], {"benchmarks": {}}
    for name in names:
        path = out / f"{name}.json"
        res = json.loads(path.read_text()) if path.exists() and status[name]["rc"] == 0 else None
        if res is None:
            rows.append([name, "-", "-", f"FAILED (rc {status[name]['rc']})", ""])
            summary["benchmarks"][name] = {**status[name], "ok": False}
            continue
        g = res["goal"]
        rows.append([name, res["ratio"], g["text"], "met" if g["met"] else "MISSED",
                     (res.get("bottleneck") or {}).get("summary", "")[:120]])
        summary["benchmarks"][name] = {**status[name], "ok": True, "ratio": res["ratio"], "goal": g,
                                       "bottleneck": res.get("bottleneck", {}).get("summary")}
        summary.setdefault("machine", res["machine"])
    headers = ["benchmark", "ratio", "goal", "met", "bottleneck"]
    print()
    print(table(headers, rows, "fdpipe benchmarks" + (" (smoke)" if args.smoke else "")))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = ["| " + " | ".join(headers[:4]) + " |", "|" + "---|" * 4]
    md += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r[:4]) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out / 'summary.json'} and summary.md")
    return 0 if all(v["ok"] for v in summary["benchmarks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
