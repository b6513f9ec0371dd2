"""How far bf16 autocast moves a teacher's whitened targets from float32's: the per-token cosine between the two on
the same views of natural photos (docs/recipe.md, "Teacher precision", holds the figures and the machine).

    python -m bench.teacher_precision [--teachers effnet-lite0,effnet-lite2] [--device cpu] [--images 8 --views 8]

fdpipe keeps bf16 for a device only if the worst token's cosine is at least 0.9999 (the bar the CLIP test holds
targets to); the default --teacher-precision is fp32 otherwise. Writes bench/results/teacher_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from fdpipe.augment import ViewTransform, make_plan  # noqa: E402
from fdpipe.models import create_teacher  # noqa: E402

from .common import RESULTS  # noqa: E402

# skimage's bundled colour photos (no download): people, animals, objects, scenes, microscopy.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def photos(n: int) -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()) for i in range(n)]


def views(teacher, images: list[Image.Image], v: int, seed: int = 0) -> torch.Tensor:
    """FD's random-resized-crop views (fdpipe's plan), normalized as the teacher's extraction normalizes them."""
    plan = make_plan(seed, v, (0.08, 1.0))
    tf = ViewTransform.from_data_config(teacher.data_config)
    px = [tf.pixels(plan.prepare(im), plan.sample(f"img{i}", j, (im.height, im.width))) for i, im in enumerate(images)
          for j in range(v)]
    return tf.normalize(torch.stack(px))


def measure(alias: str, device: str, images: int, v: int, batch: int) -> dict:
    fp32 = create_teacher(alias, device=device)
    bf16 = create_teacher(alias, device=device, precision="bf16")
    x = views(fp32, photos(images), v)
    cos, flat, times = [], [], {"fp32": 0.0, "bf16": 0.0}
    for lo in range(0, len(x), batch):
        xb = x[lo:lo + batch]
        outs = {}
        for name, t in (("fp32", fp32), ("bf16", bf16)):
            t0 = time.perf_counter()
            outs[name] = t(xb)
            times[name] += time.perf_counter() - t0
        cos.append(F.cosine_similarity(outs["fp32"], outs["bf16"], dim=-1).flatten().cpu())
        # A token whose C channels are all equal in float32 (a CNN's all-zero ReLU6 output) whitens to 0: no
        # direction to compare, so it is counted apart instead of entering the cosine figures as 0.
        flat.append((outs["fp32"].square().mean(-1) < 0.5).flatten().cpu())
    c, degenerate = torch.cat(cos).double().numpy(), torch.cat(flat).numpy()
    ok = c[~degenerate]
    return {"teacher": alias, "timm_name": fp32.info.timm_name, "image_size": fp32.info.image_size,
            "views": len(x), "tokens": int(c.size), "degenerate_tokens": int(degenerate.sum()),
            "cosine_min": float(ok.min()), "cosine_mean": float(ok.mean()), "cosine_p01": float(np.quantile(ok, 0.01)),
            "seconds_fp32": times["fp32"], "seconds_bf16": times["bf16"], "keeps_bf16": bool(ok.min() >= 0.9999)}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX-512'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.teacher_precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="effnet-lite0,effnet-lite2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(t, args.device, args.images, args.views, args.batch_size) for t in args.teachers.split(",")]
    out = {"device": args.device, "machine": machine(args.device), "torch": torch.__version__, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "teacher_precision.json").write_text(json.dumps(out, indent=2))
    print(f"{out['machine']} (torch {torch.__version__}, {args.device})")
    for r in rows:
        print(f"{r['teacher']:>14} {r['image_size']} px, {r['tokens']} tokens ({r['degenerate_tokens']} flat): "
              f"cosine min {r['cosine_min']:.6f}, 1% {r['cosine_p01']:.6f}, mean {r['cosine_mean']:.6f}; "
              f"{r['seconds_fp32']:.1f} s fp32, "
              f"{r['seconds_bf16']:.1f} s bf16 -> {'bf16 kept' if r['keeps_bf16'] else 'fp32'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
