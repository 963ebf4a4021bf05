"""The model step (geoseg.engine.predict.Predictor): eager, autocast and compiled forms."""

from __future__ import annotations

import json
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
from conftest import AERIAL

from geoseg.engine.job import segment
from geoseg.engine.predict import Predictor
from geoseg.engine.scene import SegmentOptions
from geoseg.errors import CompileError, ConfigError
from geoseg.models.card import ModelCard
from geoseg.models.store import load_model, normalize

SCENE = AERIAL / "23322E759967N_clipped_1m_1of2.tif"  # 341 x 280 RGB


def _tiles(count: int, size: int = 128) -> np.ndarray:
    """``count`` real RGB tiles (uint8, ``(count, 3, size, size)``) from the aerial scene."""
    with rasterio.open(SCENE) as src:
        image = src.read()
    starts = [(r, c) for r in (0, 100, 200) for c in (0, 80, 150)][:count]
    return np.stack([image[:, r : r + size, c : c + size] for r, c in starts])


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def test_probabilities_are_the_models_softmax(trained_aerial_model: Path) -> None:
    data = _tiles(3)
    card, model, _ = load_model(trained_aerial_model)
    with torch.inference_mode():
        expected = torch.softmax(model(normalize(torch.from_numpy(data), card)), dim=1).numpy()
    probs = Predictor(trained_aerial_model, "cpu").probabilities(data)
    assert probs.dtype == np.float16 and probs.shape == (3, 5, 128, 128)
    np.testing.assert_allclose(probs.astype(np.float32), expected, atol=1e-3)


def test_normalization_is_the_cards_affine_map_band_by_band() -> None:
    card = ModelCard.model_validate(
        yaml.safe_load(
            "name: n\narch: unet\ntotal_stride: 16\nbands: [red, green, blue, nir]\n"
            "input_dtypes: [uint16, float32]\nnormalization: {scale: [0.5, 0.25, 1.0, 2.0], "
            "offset: [1.0], mean: [10.0, 20.0, 30.0, 40.0], std: [2.0, 4.0, 8.0, 16.0]}\n"
            "classes: [{id: 0, name: c, color: [0, 0, 0]}]\n"
        )
    )
    x = np.random.default_rng(0).integers(0, 10_000, (2, 4, 8, 8)).astype(np.uint16)
    per_band = [[0.5, 0.25, 1.0, 2.0], [10.0, 20.0, 30.0, 40.0], [2.0, 4.0, 8.0, 16.0]]
    scale, mean, std = (np.array(v)[None, :, None, None] for v in per_band)
    expected = (x * scale + 1.0 - mean) / std
    got = normalize(torch.from_numpy(x), card)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
    some = normalize(torch.from_numpy(x), card, [3, 1])  # the CRF's feature bands
    np.testing.assert_allclose(some.numpy(), expected[:, [3, 1]], rtol=1e-6, atol=1e-6)
    floats = torch.from_numpy(x.astype(np.float32))
    normalize(floats, card)
    np.testing.assert_array_equal(floats.numpy(), x)  # the input is left as it was


def test_a_read_only_batch_gives_the_same_probabilities_without_a_warning(
    trained_aerial_model: Path,
) -> None:
    data = _tiles(2)
    predictor = Predictor(trained_aerial_model, "cpu")
    expected = predictor.probabilities(data).copy()
    data.setflags(write=False)  # as a batch from Ray's object store arrives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = predictor.probabilities(data)
    np.testing.assert_array_equal(probs, expected)
    assert not data.flags.writeable


def test_compiled_model_pads_a_short_batch_and_compiles_once(
    trained_aerial_model: Path, compile_cache: Path
) -> None:
    eager = Predictor(trained_aerial_model, "cpu")
    compiled = Predictor(trained_aerial_model, "cpu", compile=True, batch_size=4)
    before = set(compile_cache.glob("*.pt2"))
    results = {}
    for count in (4, 3, 1):  # a full batch, then short ones (a scene's last batch)
        data = _tiles(count)
        got = compiled.probabilities(data)
        want = eager.probabilities(data)
        assert got.shape == want.shape == (count, 5, 128, 128)
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9999
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
        results[count] = got
    # One package for the three batch sizes, kept in the cache.
    built = compiled._step.built
    assert len(built) == 1 and set(compile_cache.glob("*.pt2")) - before == set(built)
    # A new process (here: a new predictor) loads it instead of compiling, same numbers.
    again = Predictor(trained_aerial_model, "cpu", compile=True, batch_size=4)
    np.testing.assert_array_equal(again.probabilities(_tiles(3)), results[3])
    assert again._step.built == []


def test_an_unreadable_compiled_package_is_compiled_again(trained_aerial_model: Path) -> None:
    first = Predictor(trained_aerial_model, "cpu", "bf16", compile=True, batch_size=2)
    want = first.probabilities(_tiles(2))
    (package,) = first._step.built
    whole = package.read_bytes()
    middle = len(whole) // 2  # inside the shared library: its CRC no longer matches
    # A disk that filled up mid-copy; a bad sector (loaded, the library would run garbage).
    for damaged in (whole[:middle], whole[:middle] + bytes(4096) + whole[middle + 4096 :]):
        package.write_bytes(damaged)
        again = Predictor(trained_aerial_model, "cpu", "bf16", compile=True, batch_size=2)
        np.testing.assert_array_equal(again.probabilities(_tiles(2)), want)
        assert again._step.built == [package]
        with zipfile.ZipFile(package) as rebuilt:
            assert rebuilt.testzip() is None  # every member whole
    # Loading leaves nothing beside the package.
    assert sorted(p.name for p in package.parent.glob(".*")) == []


def test_threads_calling_one_compiled_model_at_once_get_their_own_results(
    trained_aerial_model: Path,
) -> None:
    """An actor's forward streams: calls run at once (the GIL is let go), each its own batch."""
    torch.set_num_threads(1)
    compiled = Predictor(trained_aerial_model, "cpu", compile=True, batch_size=2, concurrency=2)
    batches = [_tiles(2), _tiles(4)[2:], _tiles(6)[4:], _tiles(8)[6:]]
    alone = [compiled.probabilities(b).copy() for b in batches]
    assert not np.array_equal(alone[0], alone[1])
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            together = list(pool.map(lambda b: compiled.probabilities(b).copy(), batches))
            for got, want in zip(together, alone, strict=True):
                np.testing.assert_array_equal(got, want)


def test_a_compiled_graph_that_disagrees_with_the_model_is_refused(
    trained_aerial_model: Path, compile_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A faulty compiler (here: the exported graph reverses the classes) never reaches the cache."""
    from geoseg.engine import aot

    def swapped(self: aot._Graph, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)[:, [4, 3, 2, 1, 0]]

    monkeypatch.setattr(aot._Graph, "forward", swapped)
    before = sorted(compile_cache.iterdir())
    predictor = Predictor(trained_aerial_model, "cpu", compile=True, batch_size=3)
    refused = r"disagrees with the eager model on its first batch \(.*class agreement \d+\.\d+%\)"
    with pytest.raises(CompileError, match=refused + ": run without --compile"):
        predictor.probabilities(_tiles(3))
    assert sorted(compile_cache.iterdir()) == before  # nothing stored, no temporary left


def test_bf16_autocast_keeps_the_class_map(trained_aerial_model: Path) -> None:
    data = _tiles(9)
    fp32 = Predictor(trained_aerial_model, "cpu").probabilities(data).argmax(1)
    bf16 = Predictor(trained_aerial_model, "cpu", "bf16").probabilities(data).argmax(1)
    agreement = (bf16 == fp32).mean()
    assert 0.995 <= agreement < 1.0, agreement  # bf16 really ran, and changed next to nothing


def test_precisions_the_card_or_the_device_cannot_run_are_refused(
    trained_aerial_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"fp16 autocast needs a CUDA device.*use bf16"):
        Predictor(trained_aerial_model, "cpu", "fp16")
    model = tmp_path / "fp32-only"
    model.mkdir()
    card = yaml.safe_load((trained_aerial_model / "model.yaml").read_text())
    card["precisions"] = ["fp32"]
    (model / "model.yaml").write_text(yaml.safe_dump(card))
    (model / "weights.safetensors").symlink_to(trained_aerial_model / "weights.safetensors")
    with pytest.raises(ConfigError, match="precision 'bf16' changes its class map"):
        Predictor(model, "cpu", "bf16")


def test_segment_with_a_compiled_model_matches_eager(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path
) -> None:
    masks = {}
    for label, compile in (("eager", False), ("compiled", True)):
        options = SegmentOptions(progress=False, polygons=False, compile=compile)
        results = segment([str(SCENE)], trained_aerial_model, tmp_path / label, options)
        assert [r.status for r in results] == ["ok"], [r.error for r in results]
        with rasterio.open(tmp_path / label / SCENE.stem / "mask.tif") as src:
            masks[label] = src.read(1)
        run = json.loads((tmp_path / label / "run.json").read_text())
        assert run["parameters"]["compile"] is compile
    assert masks["compiled"].shape == (341, 280)
    assert (masks["compiled"] == masks["eager"]).mean() >= 0.9999


def test_forward_streams_share_the_actors_cores_and_give_the_same_mask(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path
) -> None:
    """Two forward passes at a time in one actor (``--streams 2``), each on half its cores."""
    import ray

    cores = int(ray.cluster_resources()["CPU"])
    masks, workers = {}, {}
    for streams in (1, 2, None):
        options = SegmentOptions(
            progress=False, polygons=False, streams=streams, tile_size=128, overlap=32,
            batch_size=2,
        )  # fmt: skip
        out = tmp_path / str(streams)
        results = segment([str(SCENE)], trained_aerial_model, out, options)
        assert [r.status for r in results] == ["ok"], [r.error for r in results]
        assert results[0].tiles == 16  # 8 batches: both streams busy
        with rasterio.open(out / SCENE.stem / "mask.tif") as src:
            masks[streams] = src.read(1)
        workers[streams] = json.loads((out / "run.json").read_text())["workers"]
    assert [(w[0]["streams"], w[0]["torch_threads"]) for w in workers.values()] == [
        (1, cores),
        (2, max(1, cores // 2)),
        (2, 1) if cores >= 2 else (1, 1),  # the default: two streams on 2 or more CPU cores
    ]
    assert masks[1].shape == (341, 280)
    # Other thread counts may round the last bits of a float32 sum differently.
    assert (masks[2] == masks[1]).mean() >= 0.9999


def test_fp16_on_a_cluster_without_gpus_is_refused_before_any_work(
    ray_local: None, trained_aerial_model: Path, tmp_path: Path
) -> None:
    options = SegmentOptions(progress=False, polygons=False, precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a GPU and the Ray cluster has none"):
        segment([str(SCENE)], trained_aerial_model, tmp_path / "out", options)
    assert list((tmp_path / "out").iterdir()) == []


def test_read_tasks_do_not_import_torch() -> None:
    """A Ray worker imports the module of the task it runs: torch there costs ~300 MiB each."""
    import subprocess
    import sys

    code = "import sys, geoseg.engine.reads; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
