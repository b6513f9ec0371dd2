"""How many stored views are enough? Stored V in {1, 2, 4, 8} against fresh-view FD (online, a new view per epoch).

The demo's setting, shrunk to fit about an hour on 2 CPU cores: effnet-lite0 block 4 (crops of 35-100%) over a
Fashion-MNIST pool, an fd-vit-tiny student, the demo's fine-tuning recipe. Every point distils for the same epochs
and steps (more epochs than the largest V, so a stored point sees each of its views more than once), with the same
seed, data order and loop; only where the targets come from differs:
- stored V: `fdpipe extract --views V`, then `fdpipe distill --store`;
- fresh: `fdpipe distill --teacher ... --fresh-views` (epoch e takes view e of every image: no view repeats).

Each point reports the 20-NN top-1 of the distilled student's pooled features (train pool -> test split), the
fine-tuned top-1 (the demo's recipe on a labelled subset), extraction time (the teacher's, inside distill, for the
fresh point), store bytes and distill time. V=2 and fresh run with two seeds, to show the spread. --smoke (V=2 and
fresh, one seed, 32 images) checks the script end to end, never the accuracy. It writes
docs/views.md (table, plot, command, machine, date) and bench/results/views.json. Opt-in: not part of `make bench`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import common
from .common import ROOT, log

NAME = "views"
TEACHER = ["--teacher", "effnet-lite0", "--layer", "4", "--crop-scale", "0.35", "1"]
FINETUNE = ["--no-mixup", "--no-randaug", "--min-crop", "0.35", "--layer-decay", "0.85", "--drop-path", "0.1",
            "--reprob", "0"]


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, images=auto("1200 pool images; smoke 32"), batch_size=auto("32"))
    p.add_argument("--epochs", type=int, default=None, help="distill epochs per point [16; smoke 2]")
    p.add_argument("--views-list", default=None, help="stored V values [1,2,4,8; smoke 2]")
    p.add_argument("--teacher-size", type=int, default=None, help="teacher input px [96; smoke 32]")
    p.add_argument("--student-size", type=int, default=None, help="student input px [48; smoke 16]")
    p.add_argument("--test-images", type=int, default=None, help="test split images for k-NN and fine-tuning [1000]")
    p.add_argument("--labels-per-class", type=int, default=None, help="fine-tuning labels per class [20; smoke 2]")
    p.add_argument("--finetune-epochs", type=int, default=None, help="[15; smoke 1]")
    p.add_argument("--doc", default=str(ROOT / "docs" / "views.md"), help="the Markdown report to write")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return common.run_with(NAME, args, run)


def fdpipe(*args: Any) -> float:
    """Run one fdpipe command; its wall seconds. A failure stops the benchmark with its last line."""
    t0 = time.time()
    p = subprocess.run([str(Path(sys.executable).parent / "fdpipe"), *map(str, args)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"fdpipe {shlex.join(map(str, args[:2]))} failed: {p.stderr.strip().splitlines()[-1:]}")
    return time.time() - t0


def knn_top1(run: Path, pool: int, test: int, size: int, k: int = 20) -> float:
    """20-NN top-1 (cosine) of the student's pooled features: the pool's images (labelled) vote for the test split."""
    from fdpipe.data import decode_rgb, open_source
    from fdpipe.models import load_model

    model, _, _ = load_model(str(run))
    model.eval()
    mean, std = torch.tensor([0.5] * 3).view(1, 3, 1, 1), torch.tensor([0.5] * 3).view(1, 3, 1, 1)

    def features(spec: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = open_source(spec, limit=n)
        feats, labels = [], []
        for a in range(0, len(src), 256):
            imgs = [decode_rgb(src[i].data).resize((size, size)) for i in range(a, min(a + 256, len(src)))]
            x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]).float() / 255
            with torch.no_grad():
                f = model.forward_features((x - mean) / std).mean(1)
            feats.append(torch.nn.functional.normalize(f, dim=1))
            labels += [src.labels[i] for i in range(a, min(a + 256, len(src)))]
        return torch.cat(feats), torch.tensor(labels)

    ftr, ytr = features("fashion-mnist", pool)
    fte, yte = features("fashion-mnist:test", test)
    idx = (fte @ ftr.T).topk(min(k, len(ftr)), dim=1).indices
    votes = torch.nn.functional.one_hot(ytr[idx], 10).sum(1)
    return float((votes.argmax(1) == yte).float().mean() * 100)


def run(ctx: common.Context) -> int:
    a, smoke = ctx.args, ctx.args.smoke
    pool = a.images or (32 if smoke else 1200)
    epochs = a.epochs or (2 if smoke else 16)
    vs = [int(v) for v in (a.views_list or ("2" if smoke else "1,2,4,8")).split(",")]
    tsize, ssize = a.teacher_size or (32 if smoke else 96), a.student_size or (16 if smoke else 48)
    test = a.test_images or (40 if smoke else 1000)
    lpc = a.labels_per_class or (2 if smoke else 20)
    ft_epochs = a.finetune_epochs or (1 if smoke else 15)
    batch = a.batch_size or 32
    seeds = {} if smoke else {2: [0, 1], "fresh": [0, 1]}  # the spread of V=2 and fresh; smoke: one seed each
    common_distill = ["--student", "fd-vit-tiny", "--image-size", ssize, "--epochs", epochs, "--batch-size", batch,
                      "--lr", "1.5e-3", "--drop-path", "0", "--min-lr", "0", "--workers", ctx.workers, "--quiet"]
    finetune = ["--data", "fashion-mnist", "--labels-per-class", lpc, "--val", "fashion-mnist:test", "--val-limit",
                test, "--image-size", ssize, "--epochs", ft_epochs, "--batch-size", min(50, 10 * lpc), "--lr", "2e-3", *FINETUNE,
                "--warmup-epochs", f"{ft_epochs * 0.05:g}", "--eval-every", ft_epochs, "--workers", ctx.workers,
                "--quiet"]
    log(f"[{NAME}] pool {pool}, {epochs} epochs per point, stored V {vs} and fresh views, teacher {tsize} px, "
        f"student {ssize} px")
    points: list[dict[str, Any]] = []
    for v in [*vs, "fresh"]:
        for seed in seeds.get(v, [0]):
            name = f"V{v}" if v != "fresh" else "fresh"
            work = ctx.work / f"{name}-s{seed}"
            point: dict[str, Any] = {"point": name, "views": v, "seed": seed}
            if v == "fresh":
                point["extract_s"] = None
                point["store_bytes"] = 0
                point["distill_s"] = fdpipe("distill", *TEACHER, "--teacher-image-size", tsize, "--data",
                                            "fashion-mnist", "--limit", pool, "--views", 1, "--fresh-views",
                                            "--plan-seed", seed, "--seed", seed, *common_distill, "--out",
                                            work / "distill")
            else:
                store = work / "store"
                point["extract_s"] = fdpipe("extract", *TEACHER, "--data", "fashion-mnist", "--limit", pool,
                                            "--views", v, "--image-size", tsize, "--seed", seed, "--workers",
                                            ctx.workers, "--quiet", "--out", store)
                point["store_bytes"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
                point["distill_s"] = fdpipe("distill", "--store", store, "--seed", seed, *common_distill, "--out",
                                            work / "distill")
            point["knn20_top1"] = knn_top1(work / "distill", pool, test, ssize)
            point["finetune_s"] = fdpipe("finetune", "--init", work / "distill", *finetune, "--seed", seed, "--out",
                                         work / "finetune")
            point["finetune_top1"] = json.loads((work / "finetune" / "metrics.json").read_text())["final"]["top1"]
            log(f"[{NAME}] {name} seed {seed}: 20-NN {point['knn20_top1']:.2f}%, fine-tuned "
                f"{point['finetune_top1']:.2f}%, distill {point['distill_s']:.0f}s")
            points.append(point)

    fresh = [p["finetune_top1"] for p in points if p["views"] == "fresh"]
    best_stored = max(p["finetune_top1"] for p in points if p["views"] != "fresh")
    ratio = best_stored / np.mean(fresh) if fresh and np.mean(fresh) > 0 else float("nan")
    g = common.goal("best stored-V fine-tuned top-1 / fresh-view top-1 (reported, not a goal to meet)", ratio, 0.0)
    rows = [[p["point"], p["seed"], p["knn20_top1"], p["finetune_top1"], p["extract_s"], p["store_bytes"] / 2**20,
             p["distill_s"]] for p in points]
    headers = ["point", "seed", "20-NN top-1 %", "fine-tuned top-1 %", "extract s", "store MiB", "distill s"]
    config = {"pool": pool, "epochs": epochs, "views": vs, "teacher_size": tsize, "student_size": ssize,
              "test_images": test, "labels_per_class": lpc, "finetune_epochs": ft_epochs, "batch_size": batch}
    result = {"ratio": ratio, "goal": g, "points": points, "config": config,
              "command": "python -m bench.views " + shlex.join(a.argv)}
    common.finish(ctx, result, headers, rows, f"{NAME}: stored V against fresh-view FD; {epochs} epochs, pool {pool}")
    if not smoke or a.doc != str(ROOT / "docs" / "views.md"):
        write_doc(Path(a.doc), result, headers, rows, ctx)
    return 0


def write_doc(path: Path, result: dict[str, Any], headers: list[str], rows: list[list[Any]], ctx) -> None:
    """docs/views.md and its plot: the table as measured, whatever it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    stored = sorted({p["views"] for p in pts if p["views"] != "fresh"})
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("finetune_top1", "fine-tuned"), ("knn20_top1", "20-NN")):
        ys = [np.mean([p[key] for p in pts if p["views"] == v]) for v in stored]
        line = ax.plot(stored, ys, marker="o", label=f"stored V, {label}")[0]
        fresh = [p[key] for p in pts if p["views"] == "fresh"]
        if fresh:
            ax.axhline(np.mean(fresh), ls="--", color=line.get_color(), label=f"fresh views, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(stored, [str(v) for v in stored])
    ax.set_xlabel("stored views per image V")
    ax.set_ylabel("top-1 %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    m = ctx.machine
    table = common.table(headers, rows)
    path.write_text(
        "# How many stored views are enough?\n\n"
        f"Measured by `{result['command']}` on {m.get('date')} ({m.get('cpu_model')}, {m.get('cpus')} cores, torch "
        f"{m.get('torch')}, {m.get('device')}). Settings: {json.dumps(result['config'])}.\n\n"
        f"![top-1 against V]({png.name})\n\n```text\n{table}\n```\n")
    log(f"[{NAME}] wrote {path} and {png}")


if __name__ == "__main__":
    raise SystemExit(main())
