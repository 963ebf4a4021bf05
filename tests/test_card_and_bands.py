"""Model cards, safe weight loading, band matching by name, output names that cannot escape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from geoseg.errors import BandMismatchError, ModelCardError, UnsafeOutputNameError
from geoseg.io.outputs import inside, scene_output_name
from geoseg.io.rasters import match_bands
from geoseg.models.card import WEIGHTS_FILE, canonical_band_name, read_card
from geoseg.models.store import init_model, load_model


def test_band_names_match_across_spellings() -> None:
    assert canonical_band_name("B02") == canonical_band_name("b2") == "b2"
    assert canonical_band_name("B8A") == "b8a"
    assert canonical_band_name(" Red ") == "red"
    indexes = match_bands("s2.tif", [f"B{i:02d}" for i in range(1, 13)], ["B4", "B3", "B2"], None)
    assert indexes == (4, 3, 2)


def test_missing_bands_are_named_with_the_fix() -> None:
    with pytest.raises(BandMismatchError) as info:
        match_bands("naip.tif", [None, None, None, None], ["red", "green", "blue"], None)
    message = str(info.value)
    assert "naip.tif" in message and "missing: red, green, blue" in message
    assert "--bands red,green,blue,band4" in message
    assert match_bands("naip.tif", [None] * 4, ["red", "nir"], ["red", "green", "blue", "nir"]) == (
        1,
        4,
    )
    with pytest.raises(BandMismatchError, match=r"names 3 bands .* the file has 4"):
        match_bands("naip.tif", [None] * 4, ["red"], ["red", "green", "blue"])


def test_model_init_roundtrip(tmp_path: Path) -> None:
    card = init_model("fcn", ["red", "green", "blue"], ["a", "b"], tmp_path / "m", seed=3)
    assert card.total_stride == 32
    loaded, model, digest = load_model(tmp_path / "m")
    assert loaded == card and len(digest) == 64
    assert [c.name for c in loaded.classes] == ["a", "b"]
    out = model(torch.zeros(1, 3, 64, 64))
    assert tuple(out.shape) == (1, 2, 64, 64)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    init_model(
        "unet", ["red"], ["a", "b"], tmp_path / "m", arch_args={"depth": 2, "base_channels": 4}
    )
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, tmp_path / "m" / WEIGHTS_FILE)
    with pytest.raises(ModelCardError, match="not a readable safetensors file"):
        load_model(tmp_path / "m")
    assert not marker.exists()


def test_card_validation_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.yaml").write_text("name: x\narch: unet\nunknown_key: 1\n")
    with pytest.raises(ModelCardError, match=r"model\.yaml: invalid model card"):
        read_card(tmp_path)
    (tmp_path / "model.yaml").write_text("!!python/object/apply:os.system ['touch /tmp/x']\n")
    with pytest.raises(ModelCardError, match="not valid YAML"):
        read_card(tmp_path)


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("/data/scene.tif", "scene"),
        ("s3://bucket/a/b/LC08 2020-01-01.TIF", "LC08_2020-01-01"),
        ("../../etc/passwd", "passwd"),
        ("/x/.hidden.tif", "hidden"),
    ],
)
def test_output_names_are_safe(uri: str, name: str) -> None:
    assert scene_output_name(uri) == name


def test_unusable_names_are_refused() -> None:
    with pytest.raises(UnsafeOutputNameError, match="no usable output name"):
        scene_output_name("/x/..tif")


def test_names_cannot_escape_the_output_root(tmp_path: Path) -> None:
    for bad in ("../x", "/etc", "a/b", ".."):
        with pytest.raises(UnsafeOutputNameError):
            inside(tmp_path, bad)
    assert inside(tmp_path, "ok") == tmp_path.resolve() / "ok"
