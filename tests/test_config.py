"""Job configuration: every shipped config validates; bad YAML is refused with the key's name."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from geoseg.config import GlobInput, StacSource, load_config, parse_config
from geoseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MINIMAL = "inputs: [{path: in/*.tif}]\nmodel: m\noutputs: {root: out}\n"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_point_at_real_inputs(path: Path) -> None:
    config = load_config(path)
    assert Path(config.model).is_absolute()
    for spec in config.inputs:
        if isinstance(spec, GlobInput) and "://" not in spec.path:
            assert Path(spec.path).is_absolute()
            if "shared/data" in spec.path and Path(spec.path.split("shared/data")[0]).exists():
                assert glob.glob(spec.path, recursive=True), f"{spec.path} matches nothing"
        if isinstance(spec, StacSource) and spec.stac.items:
            assert Path(spec.stac.items).is_file()


def test_nightly_config_defaults_to_dynamic_world_on_a_schedule() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "landcover-nightly.yaml")
    assert Path(config.model).name == "dynamicworld"
    assert config.schedule is not None and config.schedule.cron == "0 2 * * *"
    assert config.outputs.root.startswith("s3://")


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "job.yaml").write_text(MINIMAL)
    config = load_config(tmp_path / "cfg" / "job.yaml")
    assert config.inputs[0] == GlobInput(path=str(tmp_path / "cfg" / "in" / "*.tif"))
    assert config.model == str(tmp_path / "cfg" / "m")
    assert config.outputs.root == str(tmp_path / "cfg" / "out")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "tiling: {tile_size: 256, tilesize: 3}\n", "tiling.tilesize: unknown key"),
        (MINIMAL + "colour: red\n", "colour: unknown key"),
        (
            MINIMAL.replace(
                "outputs: {root: out}", "outputs: {root: out, polygons: {formats: [shp]}}"
            ),
            "outputs.polygons.formats.0",
        ),
        (
            MINIMAL + "tiling: {tile_size: big}\n",
            "tiling.tile_size: Input should be a valid integer",
        ),
        (MINIMAL + "runtime: {workers: 0}\n", "runtime.workers: Input should be greater than 0"),
        (MINIMAL + "schedule: {cron: '0 25 * * *'}\n", "hour must be within 0-23"),
        (MINIMAL + "schedule: {cron: '0 2 * *'}\n", "needs 5 fields"),
        ("inputs: []\nmodel: m\noutputs: {root: o}\n", "inputs: List should have at least 1 item"),
        (MINIMAL.replace("model: m\n", ""), "model: Field required"),
        ("!!python/object/apply:os.system ['touch /tmp/geoseg-pwned']\n", "Python tag, refused"),
        ("- a list\n", "a YAML mapping"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert not Path("/tmp/geoseg-pwned").exists()


def test_bad_area_units_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"outputs.polygons.min_area"):
        parse_config(
            MINIMAL.replace("{root: out}", "{root: out, polygons: {min_area: 5 acres}}"),
            "x.yaml",
            tmp_path,
        )


def test_stac_input_needs_exactly_one_source(tmp_path: Path) -> None:
    text = MINIMAL.replace("{path: in/*.tif}", "{stac: {assets: [B02]}}")
    with pytest.raises(ConfigError, match="exactly one of `items`"):
        parse_config(text, "x.yaml", tmp_path)


def test_output_digest_follows_what_shapes_outputs_only(tmp_path: Path) -> None:
    base = parse_config(MINIMAL, "x.yaml", tmp_path).output_digest()
    faster = parse_config(
        MINIMAL + "runtime: {workers: 3, tiles_in_flight: 9}\ntiling: {batch_size: 16}\n",
        "x.yaml",
        tmp_path,
    ).output_digest()
    other_tiles = parse_config(MINIMAL + "tiling: {tile_size: 256}\n", "x.yaml", tmp_path)
    other_crf = parse_config(MINIMAL + "crf: {enabled: true}\n", "x.yaml", tmp_path)
    assert faster == base
    assert other_tiles.output_digest() != base
    assert other_crf.output_digest() != base
