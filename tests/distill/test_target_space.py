"""distill --target-space coefficients: heads that predict a pca-K store's K coefficients a token."""

import json

import pytest
from safetensors.numpy import load_file

from conftest import one_line_error, write_photos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from click.testing import CliRunner

    from fdpipe.cli import main

    root = tmp_path_factory.mktemp("space")
    photos = write_photos(root / "photos", 4)
    made = {}
    for dtype in ("pca-3", "float16"):
        made[dtype] = root / dtype
        r = CliRunner().invoke(main, ["extract", "--teacher", "effnet-lite0", "--data", str(photos), "--out",
                                      str(made[dtype]), "--views", "2", "--image-size", "32", "--dtype", dtype,
                                      "--workers", "0", "--quiet"])
        assert r.exit_code == 0, r.output
    return photos, made


DISTILL = ("--epochs", 1, "--batch-size", 2, "--workers", 0, "--quiet")


def test_coefficient_heads_are_k_wide_and_recorded_so(cli, stores, tmp_path):
    photos, made = stores
    out = tmp_path / "run"
    r = cli("distill", "--store", made["pca-3"], "--data", photos, "--out", out, "--target-space", "coefficients",
            *DISTILL)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())["fdpipe"]
    assert config["teachers"][0]["channels"] == 3 and config["config"]["target_space"] == "coefficients"
    head = load_file(str(out / config["teachers"][0]["projector"]))
    assert {w.shape[0] for w in head.values()} == {3}  # a Linear to K (weight and bias), not to 1280 channels


def test_the_default_space_predicts_the_teachers_channels_from_a_pca_store(cli, stores, tmp_path):
    photos, made = stores
    r = cli("distill", "--store", made["pca-3"], "--data", photos, "--out", tmp_path / "run", *DISTILL)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["fdpipe"]["teachers"][0]["channels"] == 1280


def test_coefficients_of_a_store_without_a_basis_is_one_line(cli, stores, tmp_path):
    photos, made = stores
    r = cli("distill", "--store", made["float16"], "--data", photos, "--out", tmp_path / "run", "--target-space",
            "coefficients", *DISTILL)
    one_line_error(r, "--target-space coefficients needs pca-K stores", "is float16")
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_coefficients_online_is_one_line(cli, stores, tmp_path):
    photos, _ = stores
    r = cli("distill", "--teacher", "effnet-lite0", "--data", photos, "--out", tmp_path / "run", "--target-space",
            "coefficients", *DISTILL)
    one_line_error(r, "--target-space coefficients reads a pca-K store's coefficients: give --store")
