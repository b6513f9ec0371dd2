"""Bytes per view and fidelity of each quantizer on real teacher targets, the lossless codecs the data supports,
and the distill loss after a fixed short run per dtype.

Targets are effnet-lite0's real whitened features (ImageNet weights from the efficientnet-lite0 package) of
Fashion-MNIST images and of photo crops, computed in float32 exactly as `fdpipe extract` does. For every quantizer
in fdpipe.store.quantize.QUANTIZERS (float16, int8, and any added later):
- fidelity vs float32: cosine per token (mean, min) and relative MSE (sum of squared error / sum of squares);
- a real zarr store written by StoreWriter: bytes per view as stored (zarr's default zstd codec);
- numcodecs codecs on the stored arrays, chunk by chunk as zarr stores them (one view per chunk): compression
  ratio and encode/decode MB/s;
- a short distill run (same seed, same steps) against the dequantized targets, next to one on the float32 targets.

Headline ratio: int8 bytes per view / float16 bytes per view. Goal: <= 0.6 with mean cosine >= 0.999 and a final
distill loss within 1% of the float32 run.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import common, fixtures, stepping
from .common import log
from .timing import median

NAME = "storage"
DEFAULT_CODEC = "zstd-0 (zarr default)"
# A candidate codec must decode at least this fraction as fast as the default, and encode at least ENCODE_FLOOR as
# fast (extraction writes every target once; a GPU extracting clip-l makes GB/s of them), on the same machine.
DECODE_FLOOR = 0.75
ENCODE_FLOOR = 0.5


def codecs() -> dict:
    import numcodecs
    from numcodecs import LZ4, Blosc, GZip, Zstd

    numcodecs.blosc.use_threads = False  # one core, as one DataLoader worker decodes
    return {
        "none": None,
        "zstd-0 (zarr default)": Zstd(level=0),
        "zstd-1": Zstd(level=1),
        "zstd-9": Zstd(level=9),
        "lz4": LZ4(),
        "gzip-5": GZip(level=5),
        "blosc-lz4-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
        "blosc-zstd-shuffle": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
        "blosc-zstd-bitshuffle": Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE),
        "blosc-lz4-bitshuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE),
    }


def main(argv: list[str] | None = None) -> int:
    auto = common.auto
    p = common.parser(NAME, __doc__, teacher="effnet-lite0", image_size=auto("224; smoke 32"),
                      images=auto("64; smoke 4; per source"), views=2, steps=auto("16; smoke 1; per dtype"),
                      batch_size=auto("16; smoke 4"))
    p.add_argument("--data", default="fashion-mnist,photos,gaussian",
                   help="comma-separated sources: fashion-mnist, photos (skimage crops), gaussian (synthetic "
                        "whitened N(0,1) targets of the same shape, a stand-in for ViT features; reported, not "
                        "used for the headline or the codec choice), or any --data spec")
    p.add_argument("--lr", type=float, default=5e-4, help="distill peak lr for the short runs")
    return common.run_with(NAME, p.parse_args(argv), run)


def teacher_targets(ctx, teacher, source, plan, batch_views: int):
    """float32 targets [N, V, T, C] and index rows, computed the way the extract loop does."""
    from torch.utils.data import DataLoader

    from fdpipe.augment import ViewTransform
    from fdpipe.extract.views import PlanViews, collate, teacher_inputs

    tf = ViewTransform.from_data_config(teacher.data_config)
    ds = PlanViews(source, plan, [tf])
    per = max(1, batch_views // plan.views)
    loader = DataLoader(ds, batch_size=per, num_workers=ctx.workers, collate_fn=collate)
    outs, rows = [], []
    for items in loader:
        assert all(it.pixels is not None for it in items), [it.rows[0].get("error") for it in items]
        with torch.inference_mode():
            y = teacher(teacher_inputs(items, 0, tf, ctx.device)).cpu().numpy()
        outs.append(y.reshape(len(items), plan.views, *y.shape[1:]))
        rows += [r for it in items for r in it.rows]
    return np.concatenate(outs), rows


def fidelity(x: np.ndarray, y: np.ndarray) -> dict:
    num = (x * y).sum(-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    cos = num / np.maximum(den, 1e-12)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "rel_mse": float(((y - x) ** 2).sum() / (x ** 2).sum())}


def codec_stats(chunks: list[np.ndarray], codec) -> dict:
    raw = sum(c.nbytes for c in chunks)
    if codec is None:
        return {"bytes": raw, "ratio": 1.0, "encode_MBps": None, "decode_MBps": None}
    t0 = time.perf_counter()
    enc = [codec.encode(c) for c in chunks]
    t1 = time.perf_counter()
    for e in enc:
        codec.decode(e)
    t2 = time.perf_counter()
    size = sum(len(e) for e in enc)
    return {"bytes": size, "ratio": raw / size, "encode_MBps": raw / 1e6 / max(t1 - t0, 1e-9),
            "decode_MBps": raw / 1e6 / max(t2 - t1, 1e-9)}


def run(ctx: common.Context) -> int:
    from fdpipe.augment import AugmentationPlan
    from fdpipe.data import open_source
    from fdpipe.distill.train import DistillConfig
    from fdpipe.extract.loop import ExtractConfig, store_settings
    from fdpipe.models import create_teacher
    from fdpipe.store import StoreWriter, open_store
    from fdpipe.store.quantize import QUANTIZERS

    a, smoke = ctx.args, ctx.args.smoke
    size = a.image_size or (32 if smoke else 224)
    n = a.images or (4 if smoke else 64)
    steps = a.steps or (1 if smoke else 16)
    batch = a.batch_size or (4 if smoke else 16)
    dev = str(ctx.device)
    weights = fixtures.teacher_weights(a.teacher, size, ctx.work)
    teacher = create_teacher(a.teacher, weights=weights, image_size=size, device=dev)
    info = teacher.info
    plan = AugmentationPlan(seed=0, views=a.views)
    all_codecs = codecs()

    fid_rows, codec_rows, per_source = [], [], {}
    for name in [s.strip() for s in a.data.split(",") if s.strip()]:
        synthetic = name == "gaussian"
        spec = str(fixtures.make_photos(ctx.work / "photos", n, sizes=(48, 64) if smoke else (192, 384))) \
            if name in ("photos", "gaussian") else name
        source = open_source(spec, limit=n)
        log(f"[{NAME}] {name}: {len(source)} images x {a.views} views through {a.teacher}@{size}")
        t0 = time.time()
        if synthetic:  # no teacher: the index rows of the photos, N(0, 1) targets of the teacher's shape
            rows = [r for i in range(len(source)) for r in fixtures.image_rows(source, plan, i)]
            x = fixtures.whitened(np.random.default_rng(0), (len(source), a.views, info.tokens, info.channels))
        else:
            x, rows = teacher_targets(ctx, teacher, source, plan, 64)
        log(f"[{NAME}] {name}: targets in {time.time() - t0:.0f}s")
        t0 = time.time()
        src = {"images": len(source), "target_shape": list(x.shape[2:]), "quantizers": {}, "stores": {},
               "synthetic": synthetic}
        for dtype, q in QUANTIZERS.items():
            values, scales = q.quantize(x)
            y = q.dequantize(values, scales)
            url = ctx.work / f"store-{name.replace(':', '_').replace('/', '_')}-{dtype}"
            cfg = ExtractConfig(teacher=a.teacher, data=source.spec, out=str(url), views=a.views, dtype=dtype,
                                shard_size=len(source), limit=n)
            w = StoreWriter(str(url), store_settings(cfg, info, len(source), plan, cfg.shard_size))
            w.open()
            w.write_stored(0, *w.q.quantize(x), rows)
            assert w.try_finalize()
            st = open_store(str(url))
            back = np.stack([it.targets for it in st.iter_images()])
            assert np.array_equal(back, y, equal_nan=True), f"{dtype}: the store does not read back its quantizer"
            raw_per_view = values[0, 0].nbytes + (scales[0, 0].nbytes if scales is not None else 0)
            chunks = [np.ascontiguousarray(values[i, v]) for i in range(len(values)) for v in range(a.views)]
            scale_chunks = [] if scales is None else [np.ascontiguousarray(scales[i, v]) for i in range(len(scales))
                                                      for v in range(a.views)]
            cstats = {}
            for cname, codec in all_codecs.items():
                s = codec_stats(chunks, codec)
                if scale_chunks:
                    s2 = codec_stats(scale_chunks, codec)
                    s["bytes"] += s2["bytes"]
                    s["ratio"] = raw_per_view * len(chunks) / s["bytes"]
                s["bytes_per_view"] = s["bytes"] / len(chunks)
                cstats[cname] = s
                codec_rows.append([name, dtype, cname, s["bytes_per_view"], s["ratio"], s["encode_MBps"],
                                   s["decode_MBps"]])
            f = fidelity(x, y)
            src["quantizers"][dtype] = {**f, "quantizer": q.to_dict(), "raw_bytes_per_view": raw_per_view,
                                        "stored_bytes_per_view": st.bytes_per_view(), "codecs": cstats}
            src["stores"][dtype] = str(url)
            fid_rows.append([name, dtype, raw_per_view, st.bytes_per_view(), raw_per_view / st.bytes_per_view(),
                             f"{f['cos_mean']:.6f}", f"{f['cos_min']:.5f}", f["rel_mse"]])
        src["float32"] = x
        per_source[name] = src
        log(f"[{NAME}] {name}: quantizers, stores and codecs in {time.time() - t0:.0f}s")

    # ------------------------------------------------------------------ the distill loss per dtype (first source)
    real = {k: v for k, v in per_source.items() if not v["synthetic"]} or per_source
    first = next(iter(real))
    src = per_source[first]
    kw = dict(batch_size=batch, epochs=max(1, -(-steps * batch // src["images"])), max_steps=steps,
              workers=ctx.workers, device=dev, quiet=True, seed=0, lr=a.lr)
    losses = {}
    url0 = src["stores"]["float16"]
    losses["float32"] = stepping.distill_steps(DistillConfig(out=str(ctx.work / "run-float32"), store=url0, **kw), 0,
                                               targets={url0: fixtures.targets_in_memory(array=src["float32"])})
    for dtype, url in src["stores"].items():
        losses[dtype] = stepping.distill_steps(DistillConfig(out=str(ctx.work / f"run-{dtype}"), store=url, **kw), 0)
    log(f"[{NAME}] distill runs done")
    tail = max(1, min(5, steps // 4))
    loss = {d: {"final": r["losses"][-1], f"mean_last_{tail}": float(np.mean(r["losses"][-tail:])),
                "first": r["losses"][0]} for d, r in losses.items()}
    ref = loss["float32"]["final"]
    for d in loss:
        loss[d]["rel_diff_vs_float32"] = (loss[d]["final"] - ref) / ref

    # ------------------------------------------------------------------ codec choice, over all sources and dtypes
    totals = {}
    for cname in all_codecs:
        tb = sum(s["quantizers"][d]["codecs"][cname]["bytes"] for s in real.values() for d in s["quantizers"])
        raw = sum(s["quantizers"][d]["codecs"]["none"]["bytes"] for s in real.values() for d in s["quantizers"])
        dec, enc = (median([s["quantizers"][d]["codecs"][cname][k] for s in real.values()
                            for d in s["quantizers"]]) for k in ("decode_MBps", "encode_MBps"))
        totals[cname] = {"ratio": raw / tb, "decode_MBps": dec, "encode_MBps": enc}
    default = DEFAULT_CODEC
    floor = DECODE_FLOOR * totals[default]["decode_MBps"]
    enc_floor = ENCODE_FLOOR * totals[default]["encode_MBps"]
    fast = {c: v for c, v in totals.items()
            if c == "none" or (v["decode_MBps"] >= floor and v["encode_MBps"] >= enc_floor)}
    best = max(fast, key=lambda c: fast[c]["ratio"])
    gain = totals[best]["ratio"] / totals[default]["ratio"]
    keep = best if gain >= 1.03 else default
    per_dtype_best = {}
    for d in QUANTIZERS:
        r = {c: sum(s["quantizers"][d]["codecs"]["none"]["bytes"] for s in real.values())
             / sum(s["quantizers"][d]["codecs"][c]["bytes"] for s in real.values()) for c in fast}
        per_dtype_best[d] = max(r, key=r.get)

    f16 = {s: real[s]["quantizers"]["float16"] for s in real}
    i8 = {s: real[s]["quantizers"]["int8"] for s in real}
    ratio = median([i8[s]["stored_bytes_per_view"] / f16[s]["stored_bytes_per_view"] for s in real])
    cos_ok = all(i8[s]["cos_mean"] >= 0.999 for s in real)
    loss_ok = abs(loss["int8"]["rel_diff_vs_float32"]) <= 0.01
    g = common.goal("int8 <= 0.6x float16 bytes/view, with mean cosine >= 0.999 and distill loss within 1% of "
                    "float32", ratio, 0.6, higher_is_better=False)
    g["met"] = bool(g["met"] and cos_ok and loss_ok)
    g.update(cosine_ok=cos_ok, loss_ok=loss_ok)
    for s in per_source.values():
        s.pop("float32")
    result = {
        "ratio": ratio, "goal": g, "sources": per_source, "distill_loss": loss,
        "codec_totals": totals, "codec_recommended": keep, "codec_best_fast": best,
        "codec_gain_vs_default": gain, "codec_best_per_dtype": per_dtype_best, "decode_floor_MBps": floor, "encode_floor_MBps": enc_floor,
        "config": {"teacher": a.teacher, "image_size": size, "target_shape": [info.tokens, info.channels],
                   "images": n, "views": a.views, "distill": {"student": "fd-vit-tiny", "steps": steps,
                                                               "batch_size": batch, "lr": a.lr, "source": first},
                   "device": dev},
    }
    if not g["met"]:
        why = []
        if ratio > 0.6:
            why.append(f"int8 stores {ratio:.2f}x float16's bytes: zstd already shrinks float16 "
                       f"({median([f16[s]['raw_bytes_per_view'] / f16[s]['stored_bytes_per_view'] for s in f16]):.2f}x) "
                       "more than int8")
        if not cos_ok:
            why.append("int8 cosine below 0.999: " + ", ".join(f"{s} {i8[s]['cos_mean']:.5f}" for s in i8))
        if not loss_ok:
            why.append(f"int8 loss differs by {loss['int8']['rel_diff_vs_float32']:+.2%} from float32")
        result["bottleneck"] = {"summary": "; ".join(why)}

    headers = ["source", "dtype", "raw B/view", "stored B/view", "zstd ratio", "cos mean", "cos min", "rel MSE"]
    print(common.table(["source", "dtype", "codec", "B/view", "ratio", "enc MB/s", "dec MB/s"], codec_rows,
                       f"{NAME}: lossless codecs on the stored arrays (chunks of one view, as zarr stores them)"))
    print()
    print(common.table(["dtype", "first loss", "final loss", "vs float32"],
                       [[d, v["first"], v["final"], f"{v['rel_diff_vs_float32']:+.3%}"] for d, v in loss.items()],
                       f"distill loss after {steps} steps (fd-vit-tiny, batch {batch}, lr {a.lr}, {first})"))
    smallest = max(totals, key=lambda c: totals[c]["ratio"])
    print(f"\ncodec: smallest is {smallest} ({totals[smallest]['ratio']:.3f}x, encode "
          f"{totals[smallest]['encode_MBps']:.0f} MB/s); best decoding >= {floor:.0f} MB/s and encoding >= "
          f"{enc_floor:.0f} MB/s ({DECODE_FLOOR:.0%} / {ENCODE_FLOOR:.0%} of the default's) is {best} "
          f"({totals[best]['ratio']:.3f}x vs {totals[default]['ratio']:.3f}x for the default); keep: {keep}\n")
    title = f"{NAME}: {a.teacher}@{size} targets [{info.tokens}, {info.channels}], {a.views} views"
    common.finish(ctx, result, headers, fid_rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
