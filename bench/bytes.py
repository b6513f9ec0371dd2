"""How small can a store be: bytes per view and fidelity of every target codec on real targets of two teachers, and
(with --demos) the demo's top-1 against the store's bytes, the size/accuracy frontier. Writes docs/bytes.md, a PNG
beside it and bytes.json.

Teachers (real ImageNet weights, nothing downloaded): effnet-lite2's last feature map at 260 px on photo crops, and
the demo's effnet-lite0 block 4 at 128 px on Fashion-MNIST, whitened as `fdpipe extract` whitens them. Their targets
are split by image: the first half fits what a codec fits (a PCA basis), the second half is measured.

Codecs: the store's own quantizers (`fdpipe extract --dtype`: fdpipe.store.quantize.QUANTIZERS, and `pca-K` at
K = C x PCA_FRACTIONS, its basis fitted on the first half by fdpipe.store.basis as extraction fits it on the first
shard) and a candidate measured here before it enters the store format:
- `fp8-e4m3`: torch's float8 e4m3 with a float16 scale per token (a = 448 s).
Per codec: bytes per view of the stored arrays (values and scales; zarr's 16-byte chunk index entries and pca's basis,
C x K x 4 bytes once per store, left out), the ratio to float16's, and against float32: cosine per token (mean,
min) and relative squared error.
Per store codec, its CPU cost at CLIP-L shape (8 views of [257, 1024] whitened targets, one thread): quantizing
(what extraction pays on a CPU; a GPU does it in the teacher's shadow) and dequantizing (what the training device
pays on a CPU), views per CPU-second, the median of ROUNDS. Reading the stored bytes is `bench.ceilings --dtype`'s.

The frontier: `--frontier float16:2,int4:2,int4:8` runs `fdpipe demo --dtype D --views V --seed S` for each point
(`pca-K/coefficients:V`: with `--target-space coefficients`, heads that predict the K coefficients) and each of
`--seeds` (into --frontier-dir, reusing what a run there finished), and --demos adds finished demo
folders. Their fine-tuned top-1 by (dtype, views), with each point's mean and two-seed spread, and whether its mean
lies within float16's spread of float16's mean (float16 at the demo's 2 views is the reference).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from fdpipe.options import PCA_DTYPE

from . import common, fixtures
from .common import log
from .storage import fidelity, teacher_targets

NAME = "bytes"
DOC = Path(__file__).resolve().parents[1] / "docs" / "bytes.md"
# (teacher, block or None for forward_features, pixels, source): the two
TEACHERS = (("effnet-lite2", None, 260, "photos"), ("effnet-lite0", 4, 128, "fashion-mnist"))
PCA_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 2 / 5)  # K as a fraction of C (2/5: the demo's pca-128 of 320 channels)
CLIP_L = (8, 257, 1024)  # views x tokens x channels: the shape each codec's CPU cost is measured at
ROUNDS = 5


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, images=auto("64; smoke 6; per teacher, half to fit"), views=2)
    p.add_argument("--frontier", default="", help="DTYPE[/coefficients]:VIEWS points to run the demo at, "
                                                   "comma-separated (e.g. float16:2,int4:2,pca-128/coefficients:2); "
                                                   "none by default")
    p.add_argument("--seeds", default="0,1", help="the demo's seeds for every frontier point")
    p.add_argument("--frontier-dir", default="frontier", help="where the frontier's demo runs go (reused)")
    p.add_argument("--demos", nargs="*", default=[], help="finished `fdpipe demo` folders to add to the frontier")
    p.add_argument("--doc", default=str(DOC), help="where the markdown goes (its PNG beside it)")
    return common.run_with(NAME, p.parse_args(argv), run)


# ------------------------------------------------------------------------------------------------ codecs
def _energy(fit: np.ndarray) -> np.ndarray:
    """The energy fraction of each direction of the fitted tokens' second moment (all C, descending)."""
    t = torch.from_numpy(fit.reshape(-1, fit.shape[-1])).double()
    vals = torch.linalg.eigvalsh(t.T @ t).flip(0).clamp_min(0)
    return (vals / vals.sum()).numpy()


def pca_dtype(channels: int, frac: float) -> str:
    return f"pca-{max(1, round(channels * frac))}"


def store_quantizers(fit: np.ndarray) -> dict:
    """{dtype: quantizer} of the store's dtypes for targets like `fit` [..., C]: QUANTIZERS, and pca-K at each of
    PCA_FRACTIONS bound to the basis fitted on `fit`."""
    from fdpipe.store.basis import fitted
    from fdpipe.store.quantize import QUANTIZERS, get_quantizer

    out = dict(QUANTIZERS)
    for frac in PCA_FRACTIONS:
        dtype = pca_dtype(fit.shape[-1], frac)
        q = get_quantizer(dtype)
        out[dtype] = q.with_basis(fitted(fit, q.rank))
    return out


def candidates(channels: int) -> dict[str, tuple[callable, float]]:
    """{name: (float32 [..., C] -> its reconstruction, bytes per token)} of the codecs not in the store."""

    def fp8(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        s = (t.abs().amax(-1, keepdim=True) / 448).clamp_min(2.0 ** -24).half().float()
        return (t / s).to(torch.float8_e4m3fn).float().mul_(s).numpy()

    return {"fp8-e4m3": (fp8, channels + 2)}


def store_codecs(fit: np.ndarray) -> dict[str, tuple[callable, float]]:
    """The store's quantizers, as (round trip, bytes per token)."""
    return {dtype: (lambda x, q=q: q.dequantize(*q.quantize(x)), q.stored_bytes((1, fit.shape[-1])))
            for dtype, q in store_quantizers(fit).items()}


def codec_cpu(smoke: bool) -> dict[str, dict[str, float]]:
    """Each store codec's quantize and dequantize rates on this CPU at CLIP-L shape (views per CPU-second, one
    thread, the median of ROUNDS), on whitened N(0, 1) targets: the codec's own CPU cost, apart from reading (pca-K
    at K = 1024 x PCA_FRACTIONS, its basis fitted on these targets)."""
    shape = (2, 5, 16) if smoke else CLIP_L
    x = fixtures.whitened(np.random.default_rng(0), shape)
    xt = torch.from_numpy(x)

    def rate(fn) -> float:
        times = []
        for _ in range(1 if smoke else ROUNDS):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return shape[0] / max(float(np.median(times)), 1e-9)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for dtype, q in store_quantizers(x).items():
            values, scales = q.quantize_tensor(xt)
            out[dtype] = {"quantize_views_per_cpu_s": rate(lambda: q.quantize_tensor(xt)),
                          "dequantize_views_per_cpu_s": rate(lambda: q.dequantize_tensor(values, scales)),
                          "shape": list(shape)}
        return out
    finally:
        torch.set_num_threads(threads)


def family(codec: str, channels: int) -> str:
    """A codec's name across teachers of other C: pca-K as pca-C/n (K = C / n), any other as it is."""
    k = PCA_DTYPE.fullmatch(codec)
    return f"pca-C/{channels / int(k.group(1)):.3g}" if k else codec


def clip_l_dtype(dtype: str, channels: int) -> str:
    """The dtype at CLIP-L's 1024 channels that keeps what `dtype` keeps of `channels` (pca-K: the same K / C)."""
    from fdpipe.store.quantize import get_quantizer

    k = get_quantizer(dtype).rank
    return pca_dtype(CLIP_L[-1], k / channels) if k else dtype


def verdict(front: dict) -> str:
    """Issue 27's second question, answered from the frontier: which store at <= 1/4 of float16's bytes per view
    keeps a mean top-1 within float16's two-seed spread (none, plainly, when none does)."""
    points = front["points"]
    base = points.get("float16 x 2 views")
    if base is None:
        return "No float16 x 2 views point: nothing to compare with."
    small = {p: s for p, s in points.items() if s["dtype"] != "float16" and s["bytes_vs_float16"] <= 0.25 + 1e-9}
    held = [p for p, s in small.items() if s.get("within_float16_spread")]
    head = (f"float16 x 2 views: {', '.join(f'{t:.2f}%' for t in base['top1'])} (mean {base['mean']:.2f}%, spread "
            f"{base['spread']:.2f}). ")
    if held:
        return head + f"Within that spread at <= 1/4 of float16's bytes per view: {', '.join(held)}."
    tried = "; ".join(f"{p}: mean {s['mean']:.2f}% ({s['gap_vs_float16']:+.2f})" for p, s in small.items())
    return head + ("No store at <= 1/4 of float16's bytes per view keeps a mean top-1 within that spread"
                   + (f" ({tried})." if tried else " (none was run)."))


# ------------------------------------------------------------------------------------------------ frontier
def run_frontier(points: str, seeds: str, root: Path) -> list[str]:
    """Run `fdpipe demo` at every (dtype, views) point and seed; returns the folders (a finished one is reused)."""
    import subprocess
    import sys

    folders = []
    for point in filter(None, (p.strip() for p in points.split(","))):
        dtype, views = point.split(":")
        dtype, _, space = dtype.partition("/")  # pca-K/coefficients: heads that predict the coefficients
        for seed in filter(None, (s.strip() for s in seeds.split(","))):
            out = root / f"{dtype}{'-' + space if space else ''}-v{views}-s{seed}"
            more = ["--target-space", space] if space else []
            log(f"[{NAME}] frontier: fdpipe demo --dtype {dtype} --views {views} --seed {seed} {' '.join(more)} "
                f"--out {out}")
            subprocess.run([sys.executable, "-m", "fdpipe", "demo", "--dtype", dtype, "--views", views, "--seed",
                            seed, *more, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
            folders.append(str(out))
    return folders


def frontier(demos: list[str]) -> dict:
    """The demo folders' fine-tuned top-1 by dtype and seed, each dtype's mean and spread beside float16's."""
    from fdpipe.store import open_store

    runs = []
    for d in map(Path, demos):
        stages = json.loads((d / "stages.json").read_text())
        extract, distill = stages["extract"], stages["distill"]
        dtype = extract[extract.index("--dtype") + 1] if "--dtype" in extract else "float16"
        space = distill[distill.index("--target-space") + 1] if "--target-space" in distill else "features"
        st = open_store(str(d / "store"))
        q, shape = st.quantizer, st.target_shape
        target_bytes = q.stored_bytes(shape)
        top1 = {name: json.loads((d / f"finetune-{name}" / "metrics.json").read_text())["final"]["top1"]
                for name in ("fd", "scratch")}
        runs.append({"folder": str(d), "dtype": dtype, "target_space": space,
                     "seed": int(extract[extract.index("--seed") + 1]),
                     "views": st.views, "target_bytes_per_view": target_bytes,
                     "store_bytes_per_view": st.bytes_per_view(), "top1_fd": top1["fd"],
                     "top1_scratch": top1["scratch"]})
    by = {}
    for r in runs:
        heads = " (coefficient heads)" if r["target_space"] == "coefficients" else ""
        by.setdefault(f"{r['dtype']}{heads} x {r['views']} views", []).append(r)
    summary = {}
    for point, rs in sorted(by.items(), key=lambda kv: -kv[1][0]["target_bytes_per_view"] * kv[1][0]["views"]):
        t = [r["top1_fd"] for r in sorted(rs, key=lambda r: r["seed"])]
        summary[point] = {"dtype": rs[0]["dtype"], "views": rs[0]["views"], "seeds": sorted(r["seed"] for r in rs),
                          "top1": t, "mean": float(np.mean(t)), "spread": float(max(t) - min(t)),
                          "target_bytes_per_view": rs[0]["target_bytes_per_view"],
                          "bytes_per_image": rs[0]["target_bytes_per_view"] * rs[0]["views"]}
    base = summary.get("float16 x 2 views")
    for dtype, s in summary.items():
        if base is not None:
            s["gap_vs_float16"] = s["mean"] - base["mean"]
            s["bytes_vs_float16"] = s["target_bytes_per_view"] / base["target_bytes_per_view"]
            s["bytes_per_image_vs_float16"] = s["bytes_per_image"] / base["bytes_per_image"]
            s["within_float16_spread"] = bool(abs(s["gap_vs_float16"]) <= base["spread"]) if len(base["top1"]) > 1 \
                else None
            s["seeds_overlap_float16"] = bool(min(s["top1"]) <= max(base["top1"]) and max(s["top1"]) >= min(base["top1"]))
    return {"runs": runs, "points": summary}


# ------------------------------------------------------------------------------------------------ run
def run(ctx: common.Context) -> int:
    from fdpipe.augment import AugmentationPlan
    from fdpipe.data import open_source
    from fdpipe.models import create_teacher

    a, smoke = ctx.args, ctx.args.smoke
    n = a.images or (6 if smoke else 64)
    plan = AugmentationPlan(seed=0, views=a.views)
    per_teacher, rows = {}, []
    for alias, layer, size, data in TEACHERS:
        size = 64 if smoke else size
        t0 = time.time()
        teacher = create_teacher(alias, weights=fixtures.teacher_weights(alias, size, ctx.work), image_size=size,
                                 layer=layer, device=str(ctx.device))
        spec = str(fixtures.make_photos(ctx.work / "photos", n, sizes=(48, 64) if smoke else (375, 500))) \
            if data == "photos" else data
        x, _ = teacher_targets(ctx, teacher, open_source(spec, limit=n), plan, 32)
        x = x.astype(np.float32)
        half = max(1, len(x) // 2)
        fit, test = x[:half], x[half:]
        channels, tokens = x.shape[-1], x.shape[-2]
        cum = np.cumsum(_energy(fit))
        name = f"{alias}" + (f" block {layer}" if layer is not None else " features") + f" @ {size} px"
        info = {"teacher": alias, "layer": layer, "image_size": size, "data": data, "target_shape": [tokens, channels],
                "images_fit": half, "images_measured": len(test), "views": a.views,
                "channels_for_95_energy": int(np.searchsorted(cum, 0.95) + 1),
                "channels_for_99_energy": int(np.searchsorted(cum, 0.99) + 1), "codecs": {}}
        f16_bytes = tokens * channels * 2
        for kind, table in (("store", store_codecs(fit)), ("candidate", candidates(channels))):
            for codec, (round_trip, per_token) in table.items():
                f = fidelity(test, round_trip(test))
                bpv = per_token * tokens
                info["codecs"][codec] = {"kind": kind, "bytes_per_view": bpv, "vs_float16": bpv / f16_bytes, **f}
                rows.append([name, codec, kind, bpv, bpv / f16_bytes, f"{f['cos_mean']:.5f}", f"{f['cos_min']:.4f}",
                             f["rel_mse"]])
        per_teacher[name] = info
        log(f"[{NAME}] {name}: {x.shape} in {time.time() - t0:.0f}s")
    cpu = codec_cpu(smoke)
    demos = [*run_frontier(a.frontier, a.seeds, Path(a.frontier_dir)), *a.demos]
    front = frontier(demos) if demos else None
    if front:
        demo = next(t for t in per_teacher.values() if t["teacher"] == "effnet-lite0")
        for s in front["points"].values():
            s.update(cos_mean_demo_teacher=demo["codecs"][s["dtype"]]["cos_mean"],
                     **cpu[clip_l_dtype(s["dtype"], demo["target_shape"][-1])])
        front["verdict"] = verdict(front)
    by_kind = [{family(c, t["target_shape"][-1]): v for c, v in t["codecs"].items()} for t in per_teacher.values()]
    small = [c for c in by_kind[0] if all(t[c]["vs_float16"] <= 0.25 for t in by_kind)]
    best = max(small, key=lambda c: min(t[c]["cos_mean"] for t in by_kind), default=None)
    worst = float("nan") if best is None else min(t[best]["cos_mean"] for t in by_kind)
    g = common.goal(f"a codec at <= 1/4 of float16's bytes per view (best: {best}) keeps mean cosine >= 0.99 on "
                    "both teachers (whether it keeps the top-1 is the frontier's question)", worst, 0.99)
    result = {"ratio": worst, "goal": g, "teachers": per_teacher, "codec_cpu": cpu, "frontier": front}
    headers = ["targets", "codec", "kind", "bytes/view", "x float16", "cos mean", "cos min", "rel sq err"]
    path = common.finish(ctx, result, headers, rows, f"{NAME}: target codecs on real targets, {n} images x "
                                                      f"{a.views} views per teacher (half fit, half measured)")
    if not smoke or a.doc != str(DOC):
        write_doc(Path(a.doc), json.loads(path.read_text()))
    return 0


def write_doc(doc: Path, result: dict) -> None:
    """docs/bytes.md (and bytes.png beside it) from one run's results."""
    m = result["machine"]
    lines = ["# How small can a store be?", "",
             f"Written by `python -m bench.bytes` ({time.strftime('%Y-%m-%d', time.gmtime())}, "
             f"{m.get('cpu') or 'CPU'}, torch {m.get('torch')}); rerun it to refresh this page. "
             "Codecs marked *candidate* are measured here only: `fdpipe extract --dtype` writes the *store* ones.", ""]
    for name, t in result["teachers"].items():
        lines += [f"## {name}", "",
                  f"Targets {t['target_shape']} from {t['data']}: {t['images_fit']} images x {t['views']} views fit "
                  f"the PCA basis, {t['images_measured']} x {t['views']} are measured. "
                  f"{t['channels_for_95_energy']} of {t['target_shape'][1]} directions hold 95% of the fitted "
                  f"tokens' energy, {t['channels_for_99_energy']} hold 99%.", "",
                  "| codec | kind | bytes per view | x float16 | cosine mean | cosine min | relative squared error |",
                  "|---|---|---|---|---|---|---|"]
        for c, v in t["codecs"].items():
            lines.append(f"| {c} | {v['kind']} | {v['bytes_per_view']:,.0f} | {v['vs_float16']:.3f} | "
                         f"{v['cos_mean']:.5f} | {v['cos_min']:.4f} | {v['rel_mse']:.2e} |")
        lines.append("")
    cpu = result.get("codec_cpu") or {}
    if cpu:
        shape = next(iter(cpu.values()))["shape"]
        lines += ["## CPU cost at CLIP-L shape", "",
                  f"Views of {shape[1:]} whitened targets per CPU-second (one thread, this machine), batches of "
                  f"{shape[0]}: quantizing is extraction's on a CPU (a GPU does it in the teacher's shadow), "
                  "dequantizing the training device's. Reading the stored bytes: `python -m bench.ceilings --dtype D`.",
                  "", "| codec | quantize | dequantize |", "|---|---|---|"]
        lines += [f"| {d} | {c['quantize_views_per_cpu_s']:,.0f} | {c['dequantize_views_per_cpu_s']:,.0f} |"
                  for d, c in cpu.items()]
        lines.append("")
    front = result.get("frontier")
    if front:
        lines += ["## The demo's top-1 against the store's bytes", "",
                  "`fdpipe demo --dtype D --views V --seed S` (Fashion-MNIST, 50 labels per class; bytes are the "
                  "targets' own per view, the stored student views left out). A store is within float16's spread "
                  "when its mean top-1 lies within float16's two-seed spread (max - min) of float16's mean; its "
                  "seeds overlap float16's when the two ranges of top-1 meet. Cosine: the demo teacher's (effnet-lite0 "
                  "block 4) above; CPU: views per CPU-second at CLIP-L shape, above.", "",
                  "| store | bytes per view | bytes per image | x float16 x 2 | cosine | quantize / CPU-s | "
                  "dequantize / CPU-s | seeds | top-1 (FD, fine-tuned) | mean | spread | mean - float16's | "
                  "within float16's spread | seeds overlap float16's |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for point, s in front["points"].items():
            lines.append(f"| {point} | {s['target_bytes_per_view']:,} | {s['bytes_per_image']:,} | "
                         f"{s.get('bytes_per_image_vs_float16', 1):.3f} | {s.get('cos_mean_demo_teacher', 1):.5f} | "
                         f"{s.get('quantize_views_per_cpu_s', 0):,.0f} | {s.get('dequantize_views_per_cpu_s', 0):,.0f} | "
                         f"{', '.join(map(str, s['seeds']))} | {', '.join(f'{t:.2f}%' for t in s['top1'])} | "
                         f"{s['mean']:.2f}% | {s['spread']:.2f} | {s.get('gap_vs_float16', 0):+.2f} | "
                         f"{s.get('within_float16_spread')} | {s.get('seeds_overlap_float16')} |")
        lines += ["", f"**{front['verdict']}**" if front.get("verdict") else "", ""]
    png = doc.with_suffix(".png")
    if _plot(result, png):
        lines += [f"![cosine against bytes per view]({png.name})", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    log(f"wrote {doc}")


def _plot(result: dict, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2 if result.get("frontier") else 1, figsize=(11 if result.get("frontier") else 6, 4),
                             squeeze=False)
    ax = axes[0, 0]
    for name, t in result["teachers"].items():
        xs = [v["vs_float16"] for v in t["codecs"].values()]
        ys = [1 - v["cos_mean"] for v in t["codecs"].values()]
        ax.scatter(xs, ys, label=name)
        for c, xv, yv in zip(t["codecs"], xs, ys):
            ax.annotate(c, (xv, yv), fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="bytes per view / float16's", ylabel="1 - mean cosine")
    ax.legend(fontsize=7)
    if result.get("frontier"):
        ax = axes[0, 1]
        for point, s in result["frontier"]["points"].items():
            ax.scatter([s["bytes_per_image"]] * len(s["top1"]), s["top1"], label=point)
        ax.set(xscale="log", xlabel="target bytes per image (V x bytes per view)", ylabel="demo top-1 (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
