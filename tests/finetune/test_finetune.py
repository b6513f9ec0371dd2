"""fdpipe finetune: init paths, label-scarce selection, layer decay through the optimizer, the three methods end to
end (CPU, tiny), plain-timm loading of the result, resume, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import README, one_line_error, readme_block, write_photos

from fdpipe.errors import FdpipeError
from fdpipe.finetune import init as inits
from fdpipe.finetune.data import EpochOrder, item_seed, select_indices
from fdpipe.finetune.train import FinetuneConfig, Finetuner, build_optimizer, finetune

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_file(), reason="Fashion-MNIST is not installed")
# the smallest FD student at a 2x2 grid: the whole fine-tuning path in seconds on a CPU
TINY = ("--image-size", 32, "--workers", 0, "--quiet")


def photos(folder: Path, per_class: int = 4, size=(48, 64)) -> Path:
    return write_photos(folder, 2 * per_class, size)


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def timm_load(run: Path) -> tuple[torch.nn.Module, dict]:
    """Load a fine-tuned model with plain timm only: the config's architecture and model_args, the weights file."""
    config = json.loads((run / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay=dict(file=str(run / config["weights"]),
                                                          num_classes=config["num_classes"]))
    return model.eval(), config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared CPU: one intra-op thread is several times faster than oversubscribed OpenMP."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    return photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, photo_dir) -> Path:
    """A real distilled run: effnet-lite0 features at 64 px (2x2 grid) -> fd-vit-tiny at 32 px, 2 steps."""
    from click.testing import CliRunner

    from fdpipe.cli import main

    base = tmp_path_factory.mktemp("distilled")
    runner = CliRunner()
    r = runner.invoke(main, ["extract", "--teacher", "effnet-lite0", "--data", str(photo_dir), "--out",
                             str(base / "S"), "--views", "2", "--image-size", "64", "--workers", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["distill", "--store", str(base / "S"), "--out", str(base / "RUN"), "--epochs", "1",
                             "--batch-size", "2", "--workers", "0", "--max-steps", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    return base / "RUN"


class _Bar:
    """Stands in for the progress bar and keeps every label it is given."""

    last: "_Bar"

    def __init__(self, *a, desc: str = "", **k):
        self.labels = [desc]
        _Bar.last = self

    def set_description_str(self, desc: str = "", refresh: bool = True) -> None:
        self.labels.append(desc)

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def write(self, s: str) -> None: ...
    def close(self) -> None: ...


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory, photo_dir, distilled_run) -> tuple[Path, list[str]]:
    """fdpipe finetune from the distilled run, one epoch at 32 px, its bar recorded: (run dir, the bar's labels)."""
    out = tmp_path_factory.mktemp("finetuned") / "FT"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fdpipe.training.loop.progress", _Bar)
        finetune(FinetuneConfig(init=str(distilled_run), data=str(photo_dir), val=str(photo_dir), out=str(out),
                                epochs=1, batch_size=4, mixup=False, randaug=False, min_crop=0.5, image_size=32,
                                workers=0))
    return out, _Bar.last.labels


def test_the_readme_loads_a_fine_tuned_run_that_predicts_as_fdpipes_evaluation(finetuned_run, photo_dir) -> None:
    """README 'Load a run in plain timm', both ways: the head, the input size and the normalization come back as
    saved, so timm's own data config and fdpipe's evaluate() give exactly the top-1, top-5 and loss the run recorded.

    Before, the README's pretrained_cfg_overlay=dict(file=...) took beit_base's 1000 classes and 224 px: the trained
    head was dropped for a random one and the data config was 224 px for a 32 px model."""
    from torch.utils.data import DataLoader

    from fdpipe.data import open_source
    from fdpipe.finetune.data import Labelled
    from fdpipe.finetune.evaluate import evaluate

    run, _ = finetuned_run
    final = json.loads((run / "metrics.json").read_text())["final"]
    src = open_source(str(photo_dir))
    block = readme_block("Load a run in plain timm").replace('"RUN"', repr(str(run)))
    for code in (block.split("\n# or")[0], block):  # local-dir:, then config.json + the weights file
        ns: dict = {}
        exec(code, ns)
        model = ns["model"]
        tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
        loader = DataLoader(Labelled(src, np.asarray(src.labels), tf), batch_size=4, sampler=list(range(len(src))))
        got = evaluate(model, loader, torch.device("cpu"))
        assert (got["images"], got["top1"], got["top5"]) == (final["images"], final["top1"], final["top5"])
        assert got["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_the_bar_says_when_it_waits_on_the_evaluation(finetuned_run) -> None:
    """The step count stands still while the held-out split is evaluated: the bar says so, and how far it is."""
    _, labels = finetuned_run
    assert labels[0] == labels[-1] == "finetune ce"
    assert "finetune ce [evaluating 8/8 images]" in labels


def test_the_readme_names_val_limit_for_short_runs() -> None:
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `fdpipe finetune"))
    assert "`--val-limit N`" in row


# --- selection and order ---------------------------------------------------------------------------------------


def test_labels_per_class_takes_first_k_in_seeded_order() -> None:
    """K per class, the same for the same seed, another subset for another seed; --train-limit cuts that order."""
    labels = np.repeat(np.arange(3), 20)
    a = select_indices(labels, seed=0, per_class=4)
    assert np.bincount(labels[a]).tolist() == [4, 4, 4]
    assert np.array_equal(a, select_indices(labels, seed=0, per_class=4))
    assert not np.array_equal(a, select_indices(labels, seed=1, per_class=4))
    assert set(select_indices(labels, seed=0, per_class=2)) <= set(a)  # a prefix of the same seeded order
    lim = select_indices(labels, seed=0, per_class=4, limit=5)
    assert len(lim) == 5 and set(lim) <= set(a)
    with pytest.raises(FdpipeError, match="class 1 has only 2 images"):
        select_indices(np.array([0, 0, 0, 1, 1, 2, 2, 2]), seed=0, per_class=3)


def test_epoch_order_is_a_pure_function_and_ranks_split_it() -> None:
    idx = np.arange(10, 30)
    one = [i for i, _ in EpochOrder(idx, seed=3, epoch=1)]
    assert sorted(one) == list(idx) and one == [i for i, _ in EpochOrder(idx, seed=3, epoch=1)]
    assert one != [i for i, _ in EpochOrder(idx, seed=3, epoch=2)]
    r0, r1 = (list(EpochOrder(idx, 3, 1, rank=r, world=2)) for r in (0, 1))
    assert len(r0) == len(r1) == 10 and not {i for i, _ in r0} & {i for i, _ in r1}
    assert list(EpochOrder(idx, 3, 1, start=4)) == list(EpochOrder(idx, 3, 1))[4:]
    assert item_seed(0, 1, 5) != item_seed(0, 2, 5)


# --- init --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_distilled_run_remap_keeps_the_students_features(distilled_run: Path) -> None:
    """Acceptance 3, on a real distilled run loaded through --init: every block holds the shared table, and the
    normalized tokens (hence their mean) equal the distilled student's.

    The student's features are its final norm of the blocks' tokens; the classifier has no final norm (mean pooling
    then a fresh fc_norm, as FD), so what the remap preserves exactly is every block's tokens.
    """
    import safetensors.torch

    init = inits.build(str(distilled_run), 10, drop_path=0.0)
    clf = init.model.eval()
    assert init.kind == "distilled" and init.image_size == 32
    table = safetensors.torch.load_file(str(distilled_run / "student.safetensors"))[
        "rel_pos_bias.relative_position_bias_table"]
    assert clf.rel_pos_bias is None and len(clf.blocks) == 12
    for blk in clf.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, table)
    assert clf.blocks[0].attn.relative_position_bias_table.data_ptr() != clf.blocks[1].attn.relative_position_bias_table.data_ptr()
    assert clf.head.out_features == 10 and clf.global_pool == "avg"

    config = json.loads((distilled_run / "config.json").read_text())
    student = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=str(distilled_run / "student.safetensors"),
                                                            num_classes=0)).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s_tokens = student.forward_features(x)
        c_tokens = clf.forward_features(x)  # norm is Identity: the last block's tokens
        torch.testing.assert_close(student.norm(c_tokens), s_tokens, atol=1e-5, rtol=1e-5)
        assert clf(x).shape == (3, 10)
    assert torch.equal(clf.fc_norm.weight, torch.ones_like(clf.fc_norm.weight))  # fresh, as FD starts it
    assert torch.equal(clf.fc_norm.bias, torch.zeros_like(clf.fc_norm.bias))


def test_scratch_builds_the_same_classifier_architecture(tmp_path: Path) -> None:
    """--init scratch is the baseline: per-block bias, mean pool + fc_norm, K-way head, random weights."""
    a = inits.build("scratch", 5, image_size=32)
    assert a.kind == "scratch" and a.model.head.out_features == 5 and a.model.rel_pos_bias is None
    assert a.spec.model_args["use_fc_norm"] and not a.spec.model_args["use_shared_rel_pos_bias"]
    assert a.model.blocks[0].attn.relative_position_bias_table is not None


def test_layer_decay_through_the_optimizer() -> None:
    """Acceptance 4 via build_optimizer + set_lr: lr = peak * decay^(depth + 1 - layer_id); the contrast head (core)
    trains at the full rate."""
    from fdpipe.finetune.core import CoreTuningLoss
    from fdpipe.training import set_lr

    model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=3, embed_dim=48, depth=3,
                              num_heads=3, img_size=32, patch_size=8, use_abs_pos_emb=False, use_rel_pos_bias=True)
    net = Finetuner(model, CoreTuningLoss(model.num_features, contrast_dim=8))
    opt = build_optimizer(net, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    set_lr(opt, 2e-3)  # what the loop does each step
    names = {id(p): n for n, p in net.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert set(lr_of) == set(names.values())  # every parameter is trained, once
    depth = 3
    for name, lr in lr_of.items():
        if name.startswith("core."):
            layer = depth + 1
        elif name.startswith(("model.cls_token", "model.patch_embed")):
            layer = 0
        elif name.startswith("model.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = depth + 1
        assert lr == pytest.approx(2e-3 * 0.5 ** (depth + 1 - layer)), name


# --- the recipe by student size (FD's configs) ------------------------------------------------------------------


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"init": "scratch", "data": "fashion-mnist", "out": "o", **kw})


def test_recipe_defaults_come_from_the_student_size() -> None:
    """With no --layer-decay, --drop-path or --warmup-epochs: FD's 300-epoch ViT-B row (0.6, 0.3, 20% warmup) for
    base, its ViT-L row (0.75, 0.4, 10%) for large, base's with DeiT's drop path 0.1 for tiny and small, whether the
    size is an fd-vit alias or a timm name's word."""
    from fdpipe.finetune.recipe import Recipe
    from fdpipe.finetune.train import resolved_recipe

    fd_base = Recipe(0.6, 0.3, 0.2, base_lr=1.25e-3, base_min_lr=2.5e-7, epochs=100, patch_size=16)
    fd_large = Recipe(0.75, 0.4, 0.1, base_lr=2.5e-4, base_min_lr=5e-7, epochs=50, patch_size=14)
    small = dataclasses.replace(fd_base, drop_path=0.1)
    assert resolved_recipe(_cfg(student="fd-vit-tiny")) == ("tiny", small)
    assert resolved_recipe(_cfg(student="fd-vit-small")) == ("small", small)
    assert resolved_recipe(_cfg(student="fd-vit-base")) == ("base", fd_base)
    assert resolved_recipe(_cfg(student="fd-vit-large")) == ("large", fd_large)
    assert resolved_recipe(_cfg(init="vit_large_patch16_224")) == ("large", fd_large)


def test_recipe_size_is_read_from_the_run_it_starts_from(tmp_path) -> None:
    """--init RUN and --init scratch --like RUN take the size of the run's student (its config.json name)."""
    from fdpipe.finetune.train import resolved_recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"name": "fd-vit-large", "architecture": "beit_base_patch16_224"}))
    assert resolved_recipe(_cfg(init=str(run)))[0] == "large"
    assert resolved_recipe(_cfg(like=str(run), student="fd-vit-tiny"))[0] == "large"


def test_recipe_flags_override_the_size_table() -> None:
    from fdpipe.finetune.recipe import RECIPES
    from fdpipe.finetune.train import resolved_recipe

    cfg = _cfg(student="fd-vit-large", layer_decay=0.9, drop_path=0.0)
    assert resolved_recipe(cfg)[1] == dataclasses.replace(RECIPES["large"], layer_decay=0.9, drop_path=0.0)


def test_recipe_table_is_in_the_help(cli) -> None:
    from fdpipe.finetune.recipe import RECIPES

    out = " ".join(cli("finetune", "--help").output.split())
    for size, r in RECIPES.items():
        assert (f"{size} {r.base_lr:g} {r.base_min_lr:g} {r.epochs} {r.warmup_fraction:.0%} {r.layer_decay:g} "
                f"{r.drop_path:g} {r.patch_size}") in out, size


@pytest.mark.slow
def test_a_default_run_trains_with_its_sizes_recipe(tmp_path, photo_dir) -> None:
    """fd-vit-tiny with no recipe flags: warmup over the first 20% of the steps (4 of 20), drop path 0.1 in the
    saved model, and metrics.json records the recipe it ran."""
    out = tmp_path / "r"
    r = finetune(_cfg(data=str(photo_dir), val=str(photo_dir), out=str(out), epochs=5, batch_size=2, lr=1e-3,
                      eval_every=5, image_size=32, workers=0, quiet=True))
    assert r["steps"] == 20
    lrs = [json.loads(ln)["lr"] for ln in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(ln)["kind"] == "train"]
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rel=1e-6)
    assert json.loads((out / "config.json").read_text())["model_args"]["drop_path_rate"] == 0.1
    recipe = json.loads((out / "metrics.json").read_text())["recipe"]
    assert (recipe["size"], recipe["layer_decay"], recipe["drop_path"], recipe["warmup_steps"]) == ("tiny", 0.6, 0.1, 4)


def test_random_erasing_is_fds_by_default() -> None:
    """--reprob defaults to FD's and DeiT's 0.25 (one box of per-pixel noise) in the training transform; 0 on a logits
    store's stored views."""
    from timm.data.random_erasing import RandomErasing

    from fdpipe.finetune.data import train_transform

    cfg = _cfg()
    tf = train_transform({"mean": (0.5,) * 3, "std": (0.5,) * 3}, 32, randaug=False, reprob=cfg.use_reprob)
    erasing = [t for t in tf.transforms if isinstance(t, RandomErasing)]
    assert len(erasing) == 1 and erasing[0].probability == 0.25 and erasing[0].per_pixel
    assert _cfg(method="deit", teacher_store="s", data=None).use_reprob == 0.0


def test_reprob_outside_zero_one_is_one_line(cli, tmp_path, photo_dir) -> None:
    common = ("--init", "scratch", "--data", photo_dir, "--val", photo_dir, "--out", tmp_path / "o", *TINY)
    for bad in (1.5, -0.1):
        one_line_error(cli("finetune", *common, "--reprob", bad), "--reprob must be in [0, 1]", f"(got {bad})")


def test_the_demo_keeps_its_own_recipe() -> None:
    """The demo's fine-tunes run what its numbers were measured with, whatever the size table says: layer decay
    0.85, drop path 0.1, warmup 5% of the epochs, no random erasing, the 1e-6 floor."""
    from fdpipe.demo import FULL, QUICK, stage_commands
    from fdpipe.finetune.cli import finetune as command
    from fdpipe.finetune.train import resolved_recipe
    from fdpipe.options import settings_from_cli

    for sizes in (FULL, QUICK):
        for stage in ("finetune_fd", "finetune_scratch"):
            ctx = command.make_context("finetune", stage_commands(Path("demo"), sizes)[stage][1:])
            cfg = settings_from_cli(FinetuneConfig, ctx, **ctx.params)
            _, recipe = resolved_recipe(cfg)
            assert (recipe.layer_decay, recipe.drop_path, cfg.use_reprob, cfg.min_lr) == (0.85, 0.1, 0.0, 1e-6)
            assert cfg.warmup_epochs == pytest.approx(0.05 * sizes.finetune_epochs)


# --- end to end (CPU, tiny) ---------------------------------------------------------------------------------------


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("start", ["distilled", "scratch"])
def test_fashion_mnist_end_to_end_and_plain_timm_load(cli, tmp_path, distilled_run, start) -> None:
    """Acceptance 5: finetune runs from a distilled run and from scratch; metrics.json holds top-1; plain timm
    loads the model and reproduces the reported top-1 on the same held-out images."""
    from fdpipe.data import open_source

    out = tmp_path / start
    init = str(distilled_run) if start == "distilled" else "scratch"
    r = cli("finetune", "--init", init, "--data", "fashion-mnist", "--out", out, "--epochs", 2, "--batch-size", 8,
            "--train-limit", 32, "--val-limit", 40, "--lr", 1e-3, *TINY)
    ok(r)
    assert "held-out top-1" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["epochs"]) == 2 and m["num_classes"] == 10 and m["train_images"] == 32 and m["val_images"] == 40
    assert 0 <= m["final"]["top1"] <= m["final"]["top5"] <= 100
    assert m["init"]["kind"] == start
    for f in ("model.safetensors", "config.json", "metrics.jsonl", "accuracy.png", "loss.png", "train_state.pt"):
        assert (out / f).is_file(), f

    model, config = timm_load(out)  # no fdpipe loader involved
    assert config["num_classes"] == 10 and config["model_args"]["use_fc_norm"] is True
    pc = config["pretrained_cfg"]
    tf = timm.data.create_transform(input_size=pc["input_size"], mean=pc["mean"], std=pc["std"],
                                    interpolation=pc["interpolation"], crop_pct=pc["crop_pct"])
    test = open_source("fashion-mnist:test")
    idx = select_indices(np.asarray(test.labels), seed=0, limit=40)  # the seeded --val-limit subset
    x = torch.stack([tf(test[int(i)].data.convert("RGB")) for i in idx])
    y = torch.tensor([test.labels[int(i)] for i in idx])
    with torch.no_grad():
        top1 = 100.0 * float((model(x).argmax(-1) == y).float().mean())
    assert top1 == pytest.approx(m["final"]["top1"], abs=1e-6)


@pytest.mark.slow
def test_core_tuning_end_to_end(cli, tmp_path, photo_dir) -> None:
    out = tmp_path / "core"
    ok(cli("finetune", "--init", "scratch", "--data", photo_dir, "--val", photo_dir, "--out", out, "--method", "core",
           "--epochs", 1, "--batch-size", 4, *TINY))
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(r["con"] > 0 and np.isfinite(r["loss"]) for r in train)
    assert json.loads((out / "metrics.json").read_text())["method"] == "core"
    timm_load(out)


@pytest.mark.slow
def test_deit_with_a_live_teacher(cli, tmp_path, photo_dir) -> None:
    """A distillation token against live effnet-lite0 logits (1000 ImageNet classes: the dist head is that wide);
    the saved timm model is the class head."""
    out = tmp_path / "deit"
    ok(cli("finetune", "--init", "scratch", "--data", photo_dir, "--val", photo_dir, "--out", out, "--method", "deit",
           "--teacher", "effnet-lite0", "--teacher-image-size", 32, "--distill-kind", "soft", "--epochs", 1,
           "--batch-size", 4, *TINY))
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "deit" and "top1" in m["final"]
    import safetensors.torch

    full = safetensors.torch.load_file(str(out / "distilled_classifier.safetensors"))
    assert full["head_dist.weight"].shape[0] == 1000 and "dist_token" in full
    model, config = timm_load(out)
    assert config["num_classes"] == 2 and model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    assert "class head" in config["fdpipe"]["head"]


@pytest.mark.slow
def test_deit_from_a_logits_store(cli, tmp_path, photo_dir, distilled_run) -> None:
    """fdpipe extract --target logits, then finetune --method deit --teacher-store: trains on the stored views."""
    store = tmp_path / "logits"
    ok(cli("extract", "--teacher", "effnet-lite0", "--data", photo_dir, "--out", store, "--views", 2,
           "--image-size", 32, "--target", "logits", "--workers", 0, "--quiet"))
    from fdpipe.store import open_store

    st = open_store(str(store))
    assert st.manifest["target"] == "logits" and st.target_shape == (1000,) and st.targets([(0, 1)])[0].shape == (1000,)
    out = tmp_path / "deit-store"
    ok(cli("finetune", "--init", "scratch", "--teacher-store", store, "--val", photo_dir, "--out", out,
           "--method", "deit", "--epochs", 1, "--batch-size", 4, *TINY))
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_images"] == 8 and m["final"]["images"] == 8
    cfg = json.loads((out / "config.json").read_text())["fdpipe"]["config"]
    assert cfg["teacher_store"] == str(store)
    # a features store is refused with one line
    one_line_error(cli("finetune", "--init", "scratch", "--teacher-store", distilled_run.parent / "S", "--val",
                       photo_dir, "--out", tmp_path / "x", "--method", "deit", *TINY), "not logits")


@pytest.mark.slow
def test_resume_continues_to_the_same_weights(tmp_path, photo_dir, monkeypatch) -> None:
    """A run killed after epoch 1 and resumed ends with the weights of an uninterrupted run (seeded augmentation,
    mixup and order; state saved at the epoch boundary)."""
    import safetensors.torch

    import fdpipe.finetune.train as ft

    def cfg(out, resume=False):
        return FinetuneConfig(out=str(out), init="scratch", data=str(photo_dir), val=str(photo_dir), epochs=2,
                              batch_size=4, image_size=32, workers=0, quiet=True, resume=resume, lr=1e-3)

    finetune(cfg(tmp_path / "a"))
    real = ft.evaluate
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "evaluate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(tmp_path / "b"))
    monkeypatch.setattr(ft, "evaluate", real)
    finetune(cfg(tmp_path / "b", resume=True))
    a = safetensors.torch.load_file(str(tmp_path / "a" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    evals = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in evals if r["kind"] == "eval"] == [0, 1]


# --- bad input: one line, exit 1 ------------------------------------------------------------------------------------


def test_init_that_is_not_a_checkpoint(cli, tmp_path, photo_dir, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # whatever this machine's cache holds
    common = ("--data", photo_dir, "--val", photo_dir, "--out", tmp_path / "o", "--batch-size", 4, *TINY)
    one_line_error(cli("finetune", "--init", "vit_tiny_patch16_224", "--new-head", *common), "no pretrained weights")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("finetune", "--init", empty, *common), "not a run or checkpoint")
    one_line_error(cli("finetune", "--init", tmp_path / "missing.safetensors", *common), "no such file")
    one_line_error(cli("finetune", "--init", "no_such_model_name", *common), "not a run, a checkpoint or a timm")
    (empty / "config.json").write_text("{not json")
    one_line_error(cli("finetune", "--init", empty, *common), "not valid JSON")


def test_class_count_mismatch_with_a_given_head(cli, tmp_path, photo_dir) -> None:
    """A checkpoint with a 3-class head on 2-class data is refused unless --new-head; --num-classes below the data's
    labels is refused."""
    from fdpipe.models import StudentSpec, save_model

    args = dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=16, num_classes=3)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **args)
    save_model(model, tmp_path / "ckpt", "model.safetensors", StudentSpec("x", "beit_base_patch16_224", args))
    common = ("--data", photo_dir, "--val", photo_dir, "--out", tmp_path / "o", "--batch-size", 4, *TINY)
    one_line_error(cli("finetune", "--init", tmp_path / "ckpt", *common), "3-class head", "2 classes", "--new-head")
    one_line_error(cli("finetune", "--init", "scratch", "--num-classes", 1, *common), "--num-classes 1")
    init = inits.build(str(tmp_path / "ckpt"), 2, new_head=True, drop_path=0.0)
    assert init.kind == "checkpoint" and init.model.head.out_features == 2
    same = inits.build(str(tmp_path / "ckpt"), 3, drop_path=0.0)
    torch.testing.assert_close(same.model.head.weight, model.head.weight)  # a matching head is kept


def test_labels_per_class_larger_than_available(cli, tmp_path, photo_dir) -> None:
    one_line_error(cli("finetune", "--init", "scratch", "--data", photo_dir, "--val", photo_dir, "--out",
                       tmp_path / "o", "--labels-per-class", 5, *TINY), "--labels-per-class 5", "only 4 images")


def test_option_conflicts_are_one_line(cli, tmp_path, photo_dir) -> None:
    common = ("--init", "scratch", "--data", photo_dir, "--out", tmp_path / "o", *TINY)
    one_line_error(cli("finetune", *common), "--val")  # a folder has no builtin held-out split
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--method", "deit"), "--teacher")
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--method", "core", "--mixup"), "--mixup")
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--method", "deit", "--teacher-store", "s",
                       "--randaug"), "--randaug")
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--batch-size", 64), "--batch-size 64")
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--batch-size", 3), "even --batch-size")
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--eval-every", 0), "--eval-every must be at least 1")
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--min-crop", 0), "--min-crop must be in (0, 1]")
    one_line_error(cli("finetune", *common, "--val", photo_dir, "--method", "deit", "--teacher-store", "s",
                       "--reprob", 0.25), "--reprob")


@pytest.mark.slow
def test_eval_every_n_epochs_and_always_the_last(cli, tmp_path, photo_dir) -> None:
    out = tmp_path / "e"
    ok(cli("finetune", "--init", "scratch", "--data", photo_dir, "--val", photo_dir, "--out", out, "--epochs", 3,
           "--eval-every", 2, "--batch-size", 4, "--no-mixup", "--no-randaug", "--min-crop", 0.5, *TINY))
    m = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in m["epochs"]] == [1, 2] and m["final"]["epoch"] == 2


def test_randaugment_posterize_at_full_magnitude() -> None:
    """The FD/BEiT policy's PosterizeIncreasing keeps 0 bits at magnitude 10 (reached by magnitude noise); that is a
    black image, not a Pillow ValueError mid-epoch."""
    from timm.data.auto_augment import RandAugment

    from fdpipe.finetune.data import train_transform

    tf = train_transform({"mean": (0.5,) * 3, "std": (0.5,) * 3}, 32, randaug=True)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = op(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)))
    assert np.asarray(out).max() == 0


def test_undecodable_training_image_is_one_line_from_a_worker(cli, tmp_path, photo_dir) -> None:
    """A corrupt image fails in a DataLoader worker; the user sees the worker's one line, naming the image."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    (data / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one_line_error(cli("finetune", "--init", "scratch", "--data", data, "--val", photo_dir, "--out", tmp_path / "o",
                       "--batch-size", 9, "--no-mixup", "--image-size", 32, "--workers", 1, "--quiet"),
                   "cat/broken", "decode")


@pytest.mark.slow
def test_two_ranks_under_torchrun(tmp_path, photo_dir) -> None:
    """The same code path under torchrun (gloo on CPU): each rank trains on half the images, eval sums over ranks,
    rank 0 alone writes the log and the model."""
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    run = tmp_path / "ddp"
    p = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                        str(bin_dir / "fdpipe"), "finetune", "--init", "scratch", "--data", str(photo_dir), "--val",
                        str(photo_dir), "--out", str(run), "--method", "core", "--epochs", "2", "--batch-size", "2",
                        "--image-size", "32", "--workers", "0", "--quiet"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 4  # 8 images / 2 ranks / batch 2 = 2 steps per epoch
    assert m["final"]["images"] == 8  # every held-out image once, summed over the ranks
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in records) == 4 and sum(r["kind"] == "eval" for r in records) == 2
    timm_load(run)
