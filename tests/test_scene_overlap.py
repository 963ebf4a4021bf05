"""A scene's COGs and polygons are written while the next scene's tiles are inferred."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import rasterio
from conftest import AERIAL

from geoseg.engine import job
from geoseg.engine.job import segment
from geoseg.engine.scene import PendingScene, SceneOverlap, SceneResult, SegmentOptions

SECOND = AERIAL / "23322E759967N_clipped_1m_1of2.tif"  # 341 x 280 RGB


def test_a_scene_is_finished_while_the_next_one_is_inferred(
    ray_local: None,
    fixtures: dict[str, Path],
    rgb_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = str(fixtures["good"]), str(SECOND)
    second_inferring = threading.Event()
    seen: dict[str, Any] = {}
    infer, finish = job.infer_scene, PendingScene.finish

    def infer_and_tell(uri: str, *args: Any, **kwargs: Any) -> PendingScene:
        if uri == second:
            second_inferring.set()
        return infer(uri, *args, **kwargs)

    def finish_first_once_second_runs(self: PendingScene, *args: Any) -> SceneResult:
        if self.result.uri == first:
            # Without the overlap the second scene would start only after this returns.
            seen["second started meanwhile"] = second_inferring.wait(timeout=120)
            seen["thread"] = threading.current_thread().name
        return finish(self, *args)

    monkeypatch.setattr(job, "infer_scene", infer_and_tell)
    monkeypatch.setattr(PendingScene, "finish", finish_first_once_second_runs)
    out = tmp_path / "out"
    results = segment([first, second], rgb_model, out, SegmentOptions(progress=False))

    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert seen["second started meanwhile"] is True
    assert seen["thread"].startswith("geoseg-finish")
    run = json.loads((out / "run.json").read_text())
    assert [s["uri"] for s in run["scenes"]] == [first, second]  # input order
    with rasterio.open(fixtures["good"]) as src:
        first_shape = src.shape
    for name, shape in ((fixtures["good"].stem, first_shape), (SECOND.stem, (341, 280))):
        with rasterio.open(out / name / "mask.tif") as mask:
            assert mask.shape == shape
        assert (out / name / "polygons.gpkg").is_file()
    assert [r.polygons for r in results] == [s["polygons"] for s in run["scenes"]]
    assert all(r.polygons and r.polygons > 0 for r in results)


def test_an_interrupt_during_the_next_scene_keeps_the_finished_one(
    ray_local: None,
    fixtures: dict[str, Path],
    rgb_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C (or SIGTERM, which geoseg turns into it) while the first scene is finishing."""
    first, second = str(fixtures["good"]), str(SECOND)
    infer = job.infer_scene

    def interrupted_on_the_second(uri: str, *args: Any, **kwargs: Any) -> PendingScene:
        if uri == second:
            raise KeyboardInterrupt
        return infer(uri, *args, **kwargs)

    monkeypatch.setattr(job, "infer_scene", interrupted_on_the_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment([first, second], rgb_model, out, SegmentOptions(progress=False))

    # The first scene's tiles were all inferred: it is committed and recorded, nothing partial.
    assert sorted(p.name for p in out.iterdir()) == [fixtures["good"].stem, "run.json"]
    folder = out / fixtures["good"].stem
    assert {"mask.tif", "confidence.tif", "polygons.gpkg"} <= {p.name for p in folder.iterdir()}
    run = json.loads((out / "run.json").read_text())
    assert [(s["uri"], s["status"]) for s in run["scenes"]] == [(first, "ok")]


def test_an_interrupt_while_draining_leaves_the_result_to_the_next_drain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while the caller waits for the last scene's finishing: the scene still commits,
    and the caller's ``finally`` drain must still get its result to record it."""
    result = Future.result
    interrupted: list[bool] = []

    def interrupted_once(self: Future[str], timeout: float | None = None) -> str:
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return result(self, timeout)

    monkeypatch.setattr(Future, "result", interrupted_once)
    with SceneOverlap[str]() as overlap:
        assert overlap.submit(lambda: "first") == []
        with pytest.raises(KeyboardInterrupt):
            overlap.drain()
        assert overlap.drain() == ["first"]
        assert overlap.drain() == []
