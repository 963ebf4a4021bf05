"""Reference outputs of Google's original Dynamic World SavedModel, for tests/test_dynamicworld.py.

Runs the TensorFlow SavedModel (../shared/data/models/dynamicworld/forward) on the five Sentinel-2
L1C scenes of ../shared/data/sentinel2-l1c-slovenia, each in one piece at its own size (101 x 100:
the SavedModel takes any size), and writes ``reference.npz`` next to this file:

* ``class_maps``: ``(5, 101, 100)`` uint8, the argmax of TF's logits per scene;
* ``class_maps_reflect_context``: the same, but TF is given the scene with ``REFLECT_MARGIN``
  pixels of reflected context on every side (and one more row at the bottom, to an even height) and
  the result is cropped back: the input geoseg's tiles see (see geoseg/tiling/grid.py). Any margin
  above the model's 21 px reach gives the same logits (checked: 32 and 88 px, bit-identical);
* ``logits_windows``: ``(2, 16, 16, 9)`` float32 TF logits (channels last, as TF returns them) of
  scene ``LOGITS_SCENE`` in the windows ``logits_window_offsets`` (row, col): the bottom-right
  corner (scene edges, the odd height) and an interior window;
* ``tensorflow_version``.

Run it with TensorFlow in a throwaway virtual environment, never in geoseg's (geoseg does not need
TensorFlow, and the tests never import this script)::

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 numpy rasterio
    /tmp/tfenv/bin/python tests/data/dynamicworld/make_reference.py

The inputs are normalised here with the published formula written out in float64 (not with
geoseg's code), so the tests compare geoseg's normalisation and model against independent
references.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[3] / "shared" / "data"
MODEL = SHARED / "models" / "dynamicworld" / "forward"
SCENES = [SHARED / "sentinel2-l1c-slovenia" / f"scene_{i}.tif" for i in range(5)]

# Band names as the files describe them (B01..B12 with B8A), in the model's input order.
BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12"]
# Published per-band (a, b), in BANDS order (Brown et al. 2022; ../shared/data/README.md).
NORM = np.array(
    [
        (1.7417268007636313, 2.023298706048351),
        (1.7261204997060209, 2.038905204308012),
        (1.6798346251414997, 2.179592821212937),
        (1.7734969472909623, 2.2890068333026603),
        (2.289154079164943, 2.6171674549378166),
        (2.382939712192371, 2.773418590375327),
        (2.3828939530384052, 2.7578332604178284),
        (2.1952484264967844, 2.789092484314204),
        (1.554812948247501, 2.4140534947492487),
    ]
)
LOGITS_SCENE = 2
WINDOW = 16
REFLECT_MARGIN = 32


def read_bands(path: Path) -> np.ndarray:
    """The nine model bands of a scene, ``(H, W, 9)`` float64 digital numbers."""
    with rasterio.open(path) as src:
        indexes = [src.descriptions.index(name) + 1 for name in BANDS]
        bands: np.ndarray = np.moveaxis(src.read(indexes).astype(np.float64), 0, -1)
    return bands


def normalise(x: np.ndarray) -> np.ndarray:
    """The published normalisation, literally: log, per-band shift and scale, exp, x / (x + 1)."""
    x = np.log(x * 0.005 + 1)
    x = (x - NORM[:, 0]) / NORM[:, 1]
    x = np.exp(5 * x - 1)
    out: np.ndarray = x / (x + 1)
    return out


def main() -> None:
    model = tf.saved_model.load(str(MODEL))
    forward = model.signatures["serving_default"]

    def logits_of(bands: np.ndarray) -> np.ndarray:
        x = normalise(bands).astype(np.float32)[None]
        logits: np.ndarray = forward(input_3=tf.constant(x))["functional_1"].numpy()[0]
        assert logits.shape == (*x.shape[1:3], 9), logits.shape
        return logits

    class_maps, class_maps_context, windows, offsets = [], [], [], []
    for index, path in enumerate(SCENES):
        bands = read_bands(path)
        logits = logits_of(bands)
        class_maps.append(logits.argmax(axis=-1).astype(np.uint8))
        height, width = bands.shape[:2]
        m = REFLECT_MARGIN
        padded = np.pad(bands, ((m, m + height % 2), (m, m + width % 2), (0, 0)), mode="reflect")
        context = logits_of(padded)[m : m + height, m : m + width]
        class_maps_context.append(context.argmax(axis=-1).astype(np.uint8))
        if index == LOGITS_SCENE:
            height, width = logits.shape[:2]
            offsets = [(height - WINDOW, width - WINDOW), (40, 40)]
            windows = [logits[r : r + WINDOW, c : c + WINDOW] for r, c in offsets]
    np.savez_compressed(
        HERE / "reference.npz",
        class_maps=np.stack(class_maps),
        class_maps_reflect_context=np.stack(class_maps_context),
        reflect_margin=np.int64(REFLECT_MARGIN),
        logits_scene=np.int64(LOGITS_SCENE),
        logits_window_offsets=np.array(offsets, dtype=np.int64),
        logits_windows=np.stack(windows).astype(np.float32),
        tensorflow_version=np.str_(tf.__version__),
    )
    print(f"wrote {HERE / 'reference.npz'} (TensorFlow {tf.__version__})")


if __name__ == "__main__":
    main()
