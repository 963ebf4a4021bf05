"""Dynamic World land cover (Brown et al. 2022) in plain ``torch.nn``, and its import from Google's
TensorFlow SavedModel without TensorFlow.

Reference:
    Brown, Brumby, Guzder-Williams et al., "Dynamic World, Near real-time global 10 m land use land
    cover mapping", Scientific Data 9, 251 (2022), doi:10.1038/s41597-022-01307-4. Model and
    weights: github.com/google/dynamicworld (Apache-2.0).

The architecture below was read from the SavedModel itself (the Keras layer configs stored in
``saved_model.pb`` and the ops of its serving function) and checked against it numerically (see
``tests/test_dynamicworld.py``). It is not a strided encoder-decoder: every convolution has stride
1 and the only changes of resolution are an antialiased bilinear resize to half size after the stem
and a bilinear resize back to the input size before the classifier.

The importer (:func:`import_dynamicworld`) reads the SavedModel's two parts directly:

* ``variables/variables.index`` is a LevelDB-style table ("SSTable", blocks snappy-compressed)
  mapping checkpoint keys to ``BundleEntryProto`` records (dtype, shape, shard, offset, size,
  crc32c); ``variables/variables.data-*`` holds the raw little-endian tensors at those offsets.
* ``saved_model.pb`` is a ``SavedModel`` protobuf whose object graph turns a checkpoint key such as
  ``variables/0`` into the variable's name (``conv2d/kernel``) and carries Keras's JSON config of
  every layer, used here to check that the weights fit this port (kernel sizes, strides, paddings).

Protobuf is decoded by hand (a wire-format walker over the few fields needed), snappy and crc32c
are implemented here too: geoseg never needs TensorFlow or generated protobuf classes.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from geoseg.errors import ModelCardError
from geoseg.models.card import ClassInfo, ModelCard, Normalization

log = logging.getLogger(__name__)

ARCH_NAME = "dynamicworld"

# Sentinel-2 L1C bands in the model's input order (10 m; the 20 m bands resampled to 10 m).
BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B11", "B12")

# Class names and the published Dynamic World palette, in logit order.
CLASSES: tuple[tuple[str, str], ...] = (
    ("water", "#419BDF"),
    ("trees", "#397D49"),
    ("grass", "#88B053"),
    ("flooded_vegetation", "#7A87C6"),
    ("crops", "#E49635"),
    ("shrub_and_scrub", "#DFC35A"),
    ("built", "#C4281B"),
    ("bare", "#A59B8F"),
    ("snow_and_ice", "#B39FE1"),
)

# Published input normalisation, per band in BANDS order: (a, b) of x = (log(x * 0.005 + 1) - a) / b
# on L1C digital numbers (reflectance x 10000), then squashed by exp(5 x - 1) / (exp(5 x - 1) + 1).
NORM_LOG_SCALE = 0.005
NORM_SHIFT_SCALE: tuple[tuple[float, float], ...] = (
    (1.7417268007636313, 2.023298706048351),
    (1.7261204997060209, 2.038905204308012),
    (1.6798346251414997, 2.179592821212937),
    (1.7734969472909623, 2.2890068333026603),
    (2.289154079164943, 2.6171674549378166),
    (2.382939712192371, 2.773418590375327),
    (2.3828939530384052, 2.7578332604178284),
    (2.1952484264967844, 2.789092484314204),
    (1.554812948247501, 2.4140534947492487),
)

# Recommended tiling. A pixel's logits depend on the input up to 22 px away (3x3 stem, the 4-tap
# half-size resize, nine 3x3 depthwise convs in a row at half resolution, the bilinear upsampling;
# measured with an impulse: -21..+22 px), and a tile edge changes the logits of pixels up to 20 px
# inside it, none 21 px or more inside (measured). geoseg's blend gives no weight to the outer
# overlap // 4 pixels of a tile, so an overlap of 96 (24 dead pixels; a multiple of the total stride
# 2) makes the tiled result that of the whole scene in one piece (with reflected context at the
# scene edges). 512 px tiles keep (416 / 512)^2 = 66% of the model's work.
TILE_SIZE = 512
OVERLAP = 96

# Keras's BatchNormalization default (torch's is 1e-5); the SavedModel's layers all use it.
KERAS_BN_EPSILON = 1e-3


def normalize_dynamicworld(x: Tensor) -> Tensor:
    """Published Dynamic World normalisation of L1C digital numbers ``(B, 9, H, W)``.

    Runs in float32 on ``x``'s device. ``log1p`` is ``log(1 + .)`` without the rounding of adding 1
    first, and ``sigmoid(z)`` is the published ``exp(z) / (exp(z) + 1)`` without its overflow.
    """
    if x.shape[1] != len(BANDS):
        raise ModelCardError(
            f"the dynamicworld normalisation takes {len(BANDS)} bands {list(BANDS)}, "
            f"got {x.shape[1]}"
        )
    params = torch.tensor(NORM_SHIFT_SCALE, dtype=torch.float32, device=x.device)
    shift, scale = params[:, 0].view(1, -1, 1, 1), params[:, 1].view(1, -1, 1, 1)
    x = torch.log1p(x.to(torch.float32) * NORM_LOG_SCALE)
    x = (x - shift) / scale
    return torch.sigmoid(5 * x - 1)


# --- architecture ---------------------------------------------------------------------------------


def _half_size(x: Tensor) -> Tensor:
    """``tf.image.resize(x, shape // 2, antialias=True)`` (bilinear) for NCHW ``x``.

    TF's antialiased resize is ScaleAndTranslate with a triangle kernel widened by the downsampling
    factor, truncated and renormalised at the image edges: the same (PIL-style) separable filter as
    torch's antialiased bilinear interpolation (tests/test_dynamicworld.py checks the weights).
    """
    height, width = x.shape[-2] // 2, x.shape[-1] // 2
    # torch 2.13's CPU kernel gets the vertical pass wrong when the output is 1 pixel wide but
    # taller (every row comes out as the first; width 2 or 3 inputs): resize the transpose instead.
    if width == 1 < height:
        return _half_size_core(x.transpose(-2, -1), width, height).transpose(-2, -1)
    return _half_size_core(x, height, width)


def _half_size_core(x: Tensor, height: int, width: int) -> Tensor:
    # The antialiased kernel has no bfloat16 implementation on the CPU (bf16 autocast): float32.
    out = F.interpolate(
        x.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return out.to(x.dtype)


class ConvBNMish(nn.Sequential):
    """Conv (with bias, as in the original) -> BatchNorm (Keras epsilon) -> Mish.

    Mish is ``x * tanh(softplus(x))``: the SavedModel spells it out as three ops after every
    BatchNorm. Convolutions have stride 1; 3x3 ones are zero-padded by 1 on every side, which is
    TensorFlow's ``SAME`` padding at stride 1 (symmetric, unlike at stride 2).

    Args:
        in_channels: Input channels.
        out_channels: Output channels (equal to ``in_channels`` when ``depthwise``).
        kernel_size: 1 or 3.
        depthwise: One filter per channel (Keras ``DepthwiseConv2D``, depth multiplier 1).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, depthwise: bool = False
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=kernel_size // 2,
                groups=in_channels if depthwise else 1,
            ),
            nn.BatchNorm2d(out_channels, eps=KERAS_BN_EPSILON),
            nn.Mish(),
        )


class SeparableResidualBlock(nn.Module):
    """Three (1x1 conv, 3x3 depthwise conv) pairs, plus a 1x1 projection shortcut, summed.

    Each conv is a :class:`ConvBNMish`; the sum is not activated again.

    Args:
        in_channels: Input channels.
        out_channels: Output channels of both paths.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(3):
            layers.append(ConvBNMish(width, out_channels, 1))
            layers.append(ConvBNMish(out_channels, out_channels, 3, depthwise=True))
            width = out_channels
        self.main = nn.Sequential(*layers)
        self.shortcut = ConvBNMish(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Main path plus shortcut."""
        out: Tensor = self.main(x) + self.shortcut(x)
        return out


class DynamicWorld(nn.Module):
    """The Dynamic World V1 network (Brown et al. 2022), ~231k parameters.

    Architecture (as in the SavedModel; widths 64/96/144/48):
        * ``stem``: 3x3 conv to 64 channels at full resolution.
        * Resize to half size, ``floor(H / 2) x floor(W / 2)``, bilinear with antialiasing (TF's
          ``ScaleAndTranslate`` with a triangle kernel widened x2: for even sizes a [1, 3, 3, 1] / 8
          filter at stride 2, renormalised where it overhangs the image edge).
        * ``block1`` (64 -> 96) then ``block2`` (96 -> 144): :class:`SeparableResidualBlock`.
        * ``side``: 1x1 conv to 48 channels then a 3x3 depthwise conv, also from the resized stem.
        * ``block3`` on the concatenation ``[block2, side]`` (192 -> 144).
        * Bilinear resize back to ``H x W`` (half-pixel centres), L2 normalisation over channels
          (the SavedModel's second output, an embedding), 1x1 conv to the class logits.

    The total stride is 2: for even tile sizes the half-size resize samples the same grid in every
    tile. Odd sizes work as in TensorFlow (the resize then maps ``H`` to ``floor(H / 2)`` pixels
    at a non-integer scale), but tiles of odd size would not be translation-equivariant.

    Args:
        in_channels: Input bands (9 for the published weights, see :data:`BANDS`).
        num_classes: Output classes (9 for the published weights, see :data:`CLASSES`).
    """

    total_stride: int = 2

    def __init__(self, in_channels: int = len(BANDS), num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelCardError(
                    f"{ARCH_NAME}: invalid {name}={value!r}; accepted: an integer >= 1"
                )
        self.stem = ConvBNMish(in_channels, 64, 3)
        self.block1 = SeparableResidualBlock(64, 96)
        self.block2 = SeparableResidualBlock(96, 144)
        self.side = nn.Sequential(ConvBNMish(64, 48, 1), ConvBNMish(48, 48, 3, depthwise=True))
        self.block3 = SeparableResidualBlock(144 + 48, 144)
        self.classifier = nn.Conv2d(144, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Compute per-pixel class logits.

        Args:
            x: Normalised input ``[B, in_channels, H, W]`` (see :func:`normalize_dynamicworld`),
                H and W at least 2 and preferably even.

        Returns:
            Logits ``[B, num_classes, H, W]``.
        """
        height, width = x.shape[-2:]
        if height < 2 or width < 2:
            raise ValueError(f"{ARCH_NAME}: input must be at least 2 x 2, got {height} x {width}")
        f = _half_size(self.stem(x))
        g = self.block3(torch.cat([self.block2(self.block1(f)), self.side(f)], dim=1))
        # TF2's tf.image.resize (bilinear) uses half-pixel centres: torch's align_corners=False.
        g = F.interpolate(g, size=(height, width), mode="bilinear", align_corners=False)
        # tf.math.l2_normalize clamps the squared norm at 1e-12 (F.normalize clamps the norm).
        g = g * torch.rsqrt(torch.clamp(g.square().sum(dim=1, keepdim=True), min=1e-12))
        out: Tensor = self.classifier(g)
        return out


# Keras layer names of each ConvBNMish (conv, BatchNormalization) by torch module path, from the
# SavedModel's Keras config. Keras numbered the layers in creation order, not in forward order.
KERAS_CONV_BN: tuple[tuple[str, str, str], ...] = (
    ("stem", "conv2d", "batch_normalization"),
    ("side.0", "conv2d_1", "batch_normalization_1"),
    ("side.1", "depthwise_conv2d", "batch_normalization_2"),
    ("block1.main.0", "conv2d_2", "batch_normalization_3"),
    ("block1.main.1", "depthwise_conv2d_1", "batch_normalization_4"),
    ("block1.main.2", "conv2d_3", "batch_normalization_5"),
    ("block1.main.3", "depthwise_conv2d_2", "batch_normalization_6"),
    ("block1.main.4", "conv2d_4", "batch_normalization_7"),
    ("block1.main.5", "depthwise_conv2d_3", "batch_normalization_8"),
    ("block1.shortcut", "conv2d_5", "batch_normalization_9"),
    ("block2.main.0", "conv2d_6", "batch_normalization_10"),
    ("block2.main.1", "depthwise_conv2d_4", "batch_normalization_11"),
    ("block2.main.2", "conv2d_7", "batch_normalization_12"),
    ("block2.main.3", "depthwise_conv2d_5", "batch_normalization_13"),
    ("block2.main.4", "conv2d_8", "batch_normalization_14"),
    ("block2.main.5", "depthwise_conv2d_6", "batch_normalization_15"),
    ("block2.shortcut", "conv2d_9", "batch_normalization_16"),
    ("block3.main.0", "conv2d_10", "batch_normalization_17"),
    ("block3.main.1", "depthwise_conv2d_7", "batch_normalization_18"),
    ("block3.main.2", "conv2d_11", "batch_normalization_19"),
    ("block3.main.3", "depthwise_conv2d_8", "batch_normalization_20"),
    ("block3.main.4", "conv2d_12", "batch_normalization_21"),
    ("block3.main.5", "depthwise_conv2d_9", "batch_normalization_22"),
    ("block3.shortcut", "conv2d_13", "batch_normalization_23"),
)
KERAS_CLASSIFIER = "conv2d_14"

# Keras layer classes without weights, and the TF functions (Keras TFOpLambda layers) the port
# implements: Mish (softplus, tanh, multiply), the resizes and their size arithmetic, the residual
# additions, the concatenation and the L2 normalisation.
_WEIGHTLESS_LAYERS = {"InputLayer", "Functional", "TFOpLambda", "SlicingOpLambda"}
_PORTED_FUNCTIONS = {
    "math.softplus",
    "math.tanh",
    "math.multiply",
    "compat.v1.shape",
    "__operators__.getitem",
    "math.truediv",
    "cast",
    "image.resize",
    "__operators__.add",
    "concat",
    "math.l2_normalize",
}

# Paths of the depthwise ConvBNMish units: odd positions of a block's main path, and side.1.
_DEPTHWISE_POSITIONS = (".1", ".3", ".5")

# Keras BatchNormalization variable -> torch parameter or buffer name.
_BN_VARIABLES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


# --- SavedModel reading: protobuf wire format, snappy, crc32c, SSTable, tensor bundle -------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return ``(value, next position)``."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ModelCardError("truncated varint in a protobuf or table")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list[Any]]:
    """Decode one protobuf message into ``{field number: [values]}`` without a schema.

    Varints come back as ints, length-delimited fields (strings, bytes, sub-messages, packed
    arrays) as bytes, fixed32/fixed64 as raw bytes; the caller knows which field is which.
    """
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        value: Any
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:  # groups (3, 4) are not used by any TensorFlow message read here
            raise ModelCardError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ModelCardError("truncated protobuf message")
        fields.setdefault(number, []).append(value)
    return fields


def _first(fields: dict[int, list[Any]], number: int, default: Any) -> Any:
    """The first value of a (non-repeated) field, or its protobuf default."""
    values = fields.get(number)
    return values[0] if values else default


def _snappy_decompress(data: bytes) -> bytes:
    """Decompress a raw snappy block (the format TensorFlow's table blocks use)."""
    size, pos = _varint(data, 0)
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal; lengths >= 61 follow the tag in 1-4 little-endian bytes
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(data[pos : pos + extra], "little")
                pos += extra
            length += 1
            out += data[pos : pos + length]
            pos += length
            continue
        if kind == 1:  # copy, 11-bit offset
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | data[pos]
            pos += 1
        else:  # copy, 16-bit (kind 2) or 32-bit (kind 3) offset
            length = (tag >> 2) + 1
            width = 2 if kind == 2 else 4
            offset = int.from_bytes(data[pos : pos + width], "little")
            pos += width
        if not 0 < offset <= len(out):
            raise ModelCardError("corrupt snappy block (copy before the start)")
        # Copies may overlap their own output (run-length style), so go byte by byte when needed.
        start = len(out) - offset
        if offset >= length:
            out += out[start : start + length]
        else:
            for i in range(length):
                out.append(out[start + i])
    if len(out) != size:
        raise ModelCardError(f"corrupt snappy block ({len(out)} bytes, expected {size})")
    return bytes(out)


@cache
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def _masked_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) as LevelDB/TensorFlow store it: rotated and offset ("masked")."""
    table = _crc32c_table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles (varints) padded to 40 bytes, then the magic number


def _table_block(table: bytes, handle: bytes, path: Path) -> Iterator[tuple[bytes, bytes]]:
    """The ``(key, value)`` entries of the table block that ``handle`` (offset, size) points to."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    # Each block is followed by a 1-byte compression type and a masked crc32c of block + type.
    block, trailer = table[offset : offset + size], table[offset + size : offset + size + 5]
    if len(trailer) != 5 or struct.unpack("<I", trailer[1:])[0] != _masked_crc32c(
        block + trailer[:1]
    ):
        raise ModelCardError(f"{path}: corrupt table block at offset {offset} (checksum)")
    if trailer[0] == 1:
        block = _snappy_decompress(block)
    elif trailer[0] != 0:
        raise ModelCardError(f"{path}: unsupported block compression {trailer[0]}")
    # Entries share key prefixes with their predecessor; restart offsets (uint32 each) and their
    # count end the block.
    (restarts,) = struct.unpack("<I", block[-4:])
    end = len(block) - 4 - 4 * restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size


def _read_table(path: Path) -> dict[bytes, bytes]:
    """All entries of a LevelDB-format table file (TensorFlow's ``variables.index``)."""
    table = path.read_bytes()
    if len(table) < _FOOTER_SIZE or struct.unpack("<Q", table[-8:])[0] != _TABLE_MAGIC:
        raise ModelCardError(f"{path}: not a TensorFlow tensor-bundle index (bad magic number)")
    footer = table[-_FOOTER_SIZE:]
    _, pos = _varint(footer, 0)  # the metaindex block handle: offset...
    _, pos = _varint(footer, pos)  # ...and size; the metaindex block is empty in bundles
    return {
        key: value
        for _, handle in _table_block(table, footer[pos:], path)
        for key, value in _table_block(table, handle, path)
    }


_DT_FLOAT = 1  # tensorflow.DataType


def _read_tensor_bundle(prefix: Path) -> dict[str, NDArray[np.float32]]:
    """Float tensors of a TensorFlow checkpoint ("tensor bundle") by checkpoint key."""
    entries = _read_table(prefix.with_name(prefix.name + ".index"))
    # The entry with the empty key is the BundleHeaderProto: num_shards = 1, endianness = 2.
    header = _proto_fields(entries.pop(b"", b""))
    num_shards = _first(header, 1, 1)
    if _first(header, 2, 0) != 0:
        raise ModelCardError(f"{prefix}: big-endian checkpoints are not supported")
    shards: dict[int, bytes] = {}
    tensors: dict[str, NDArray[np.float32]] = {}
    for raw_key, raw_entry in entries.items():
        key = raw_key.decode()
        # BundleEntryProto: dtype = 1, shape = 2, shard_id = 3, offset = 4, size = 5,
        # crc32c = 6 (fixed32, masked), slices = 7.
        entry = _proto_fields(raw_entry)
        if _first(entry, 1, 0) != _DT_FLOAT:
            continue  # e.g. the serialised object graph (a string tensor), not a weight
        if 7 in entry:
            raise ModelCardError(f"{prefix}: {key} is a partitioned variable (not supported)")
        # TensorShapeProto: dim = 2, each a Dim with size = 1.
        shape = tuple(
            _first(_proto_fields(dim), 1, 0)
            for dim in _proto_fields(_first(entry, 2, b"")).get(2, [])
        )
        shard = _first(entry, 3, 0)
        if shard not in shards:
            data_file = prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")
            shards[shard] = data_file.read_bytes()
        offset, size = _first(entry, 4, 0), _first(entry, 5, 0)
        data = shards[shard][offset : offset + size]
        if len(data) != size or size != 4 * int(np.prod(shape)):
            raise ModelCardError(f"{prefix}: {key}: {size} bytes do not hold a {shape} float32")
        if struct.unpack("<I", _first(entry, 6, b"\0\0\0\0"))[0] != _masked_crc32c(data):
            raise ModelCardError(f"{prefix}: {key}: checksum mismatch (corrupt data file)")
        tensors[key] = np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    return tensors


@dataclass(frozen=True)
class SavedModelContents:
    """What the importer needs from a SavedModel.

    Attributes:
        variables: Float variables by their TensorFlow name, e.g. ``"conv2d/kernel"``.
        keras_layers: Keras layer configs by layer name (from the JSON metadata of the SavedModel's
            Keras objects, nested models flattened), e.g. ``{"conv2d": {"class_name": "Conv2D",
            "config": {...}}}``; empty when the SavedModel was not written by Keras.
    """

    variables: dict[str, NDArray[np.float32]]
    keras_layers: dict[str, dict[str, Any]]


def _unescape_local_name(name: str) -> str:
    """Undo TensorFlow's checkpoint-key escaping of a child name ("." -> "..", "/" -> ".S")."""
    return re.sub(r"\.(.)", lambda m: "/" if m.group(1) == "S" else m.group(1), name)


def _collect_keras_layers(config: dict[str, Any], out: dict[str, dict[str, Any]]) -> None:
    """Add every layer of a Keras model config to ``out``, recursing into nested models."""
    for layer in config.get("config", {}).get("layers", []):
        out[layer["config"]["name"]] = layer
        if "layers" in layer.get("config", {}):
            _collect_keras_layers(layer, out)


def read_savedmodel(savedmodel_dir: Path) -> SavedModelContents:
    """Read a TensorFlow SavedModel's variables (by name) and Keras layer configs, without TF.

    Args:
        savedmodel_dir: The folder holding ``saved_model.pb`` and ``variables/``.

    Returns:
        The variables and layer configs.

    Raises:
        ModelCardError: If the folder is not a readable SavedModel.
    """
    pb_path = savedmodel_dir / "saved_model.pb"
    if not pb_path.is_file():
        raise ModelCardError(f"{savedmodel_dir}: not a TensorFlow SavedModel (no saved_model.pb)")
    try:
        return _read_savedmodel(savedmodel_dir, pb_path)
    except ModelCardError:
        raise
    except (OSError, ValueError, IndexError, KeyError, struct.error) as exc:
        # Missing files, truncated or malformed records: one clear error instead of a traceback.
        raise ModelCardError(f"{savedmodel_dir}: unreadable SavedModel: {exc!r}") from exc


def _read_savedmodel(savedmodel_dir: Path, pb_path: Path) -> SavedModelContents:
    # SavedModel: meta_graphs = 2. MetaGraphDef: object_graph_def = 7. SavedObjectGraph: nodes = 1.
    meta_graphs = _proto_fields(pb_path.read_bytes()).get(2, [])
    if not meta_graphs:
        raise ModelCardError(f"{pb_path}: no meta graph")
    object_graph = _proto_fields(_first(_proto_fields(meta_graphs[0]), 7, b""))
    nodes = [_proto_fields(node) for node in object_graph.get(1, [])]
    if not nodes:
        raise ModelCardError(f"{pb_path}: no object graph (a TF1-style SavedModel?)")

    def children(node: dict[int, list[Any]]) -> dict[str, int]:
        # SavedObject.children = 1: ObjectReference {node_id = 1, local_name = 2}.
        refs = [_proto_fields(ref) for ref in node.get(1, [])]
        return {_first(r, 2, b"").decode(): _first(r, 1, 0) for r in refs}

    # Checkpoint keys are paths of child names from the root object, e.g.
    # "variables/0/.ATTRIBUTES/VARIABLE_VALUE"; the node they reach is a SavedVariable
    # (SavedObject.variable = 7) whose name = 6 is the variable's TensorFlow name.
    variables: dict[str, NDArray[np.float32]] = {}
    bundle = _read_tensor_bundle(savedmodel_dir / "variables" / "variables")
    for key, tensor in bundle.items():
        path, _, attribute = key.partition("/.ATTRIBUTES/")
        if attribute != "VARIABLE_VALUE":
            continue
        node_id = 0
        for part in path.split("/"):
            node_id = children(nodes[node_id]).get(_unescape_local_name(part), -1)
            if node_id < 0:
                raise ModelCardError(f"{pb_path}: checkpoint key {key} is not in the object graph")
        if 7 not in nodes[node_id]:
            raise ModelCardError(f"{pb_path}: checkpoint key {key} is not a variable")
        name = _first(_proto_fields(nodes[node_id][7][0]), 6, b"").decode()
        variables[name] = tensor

    # SavedObject.user_object = 4: SavedUserObject {identifier = 1, metadata = 3}; Keras (before
    # keras_metadata.pb) stored each layer's JSON description in metadata. The root is the model.
    keras_layers: dict[str, dict[str, Any]] = {}
    if 4 in nodes[0]:
        metadata = _first(_proto_fields(nodes[0][4][0]), 3, b"")
        if metadata:
            _collect_keras_layers(json.loads(metadata), keras_layers)
    return SavedModelContents(variables=variables, keras_layers=keras_layers)


# --- import ---------------------------------------------------------------------------------------


def _keras_tuple(value: Any) -> tuple[int, ...]:
    """A Keras config tuple: ``{"class_name": "__tuple__", "items": [...]}`` or a plain list."""
    items = value["items"] if isinstance(value, dict) else value
    return tuple(int(v) for v in items)


def _check_keras_config(model: DynamicWorld, layers: dict[str, dict[str, Any]]) -> None:
    """Check the SavedModel's Keras layers against this port: same weighted layers, kernel sizes,
    strides, paddings, biases, depthwise-ness, activations and BatchNorm pairing and epsilon."""
    modules = dict(model.named_modules())
    expected: dict[str, tuple[str, nn.Conv2d]] = {}
    problems: list[str] = []
    for path, conv_name, bn_name in KERAS_CONV_BN:
        conv, bn = modules[f"{path}.0"], modules[f"{path}.1"]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        expected[conv_name] = (path, conv)
        bn_layer = layers.get(bn_name, {})
        inbound = json.dumps(bn_layer.get("inbound_nodes"))
        if bn_layer.get("class_name") != "BatchNormalization" or f'"{conv_name}"' not in inbound:
            problems.append(f"{bn_name} is not the BatchNormalization after {conv_name}")
        elif abs(bn_layer["config"].get("epsilon", 0) - bn.eps) > 1e-9:
            problems.append(f"{bn_name}: epsilon {bn_layer['config'].get('epsilon')} != {bn.eps}")
    classifier = modules["classifier"]
    assert isinstance(classifier, nn.Conv2d)
    expected[KERAS_CLASSIFIER] = ("classifier", classifier)

    found_layers = {
        name for name, layer in layers.items() if layer["class_name"] not in _WEIGHTLESS_LAYERS
    }
    expected_layers = set(expected) | {bn_name for _, _, bn_name in KERAS_CONV_BN}
    if found_layers != expected_layers:
        problems.append(
            f"layers differ: SavedModel-only {sorted(found_layers - expected_layers)}, "
            f"port-only {sorted(expected_layers - found_layers)}"
        )
    functions = {
        layer["config"].get("function")
        for layer in layers.values()
        if layer["class_name"] in ("TFOpLambda", "SlicingOpLambda")
    }
    if not functions <= _PORTED_FUNCTIONS:
        problems.append(f"TF ops the port lacks: {sorted(map(str, functions - _PORTED_FUNCTIONS))}")
    for name in sorted(found_layers & set(expected)):
        path, conv = expected[name]
        cfg = layers[name]["config"]
        depthwise = layers[name]["class_name"] == "DepthwiseConv2D"
        kernel = _keras_tuple(cfg["kernel_size"])
        same = tuple(k // 2 for k in kernel)
        found = {
            "kernel_size": kernel,
            "strides": _keras_tuple(cfg["strides"]),
            "dilation": _keras_tuple(cfg["dilation_rate"]),
            "padding": same if cfg["padding"] == "same" else (0, 0),
            "depthwise": depthwise and cfg.get("depth_multiplier") == 1,
            "bias": cfg["use_bias"],
            "activation": cfg["activation"],
        }
        port = {
            "kernel_size": conv.kernel_size,
            "strides": conv.stride,
            "dilation": conv.dilation,
            "padding": conv.padding,
            "depthwise": conv.groups == conv.in_channels > 1,
            "bias": conv.bias is not None,
            "activation": "linear",  # activations are separate ops (Mish) in the SavedModel
        }
        problems += [
            f"{name} ({path}): {key} {found[key]} != {port[key]}"
            for key in found
            if found[key] != port[key]
        ]
    if problems:
        raise ModelCardError(
            "the SavedModel's architecture differs from geoseg's Dynamic World port: "
            + "; ".join(problems)
        )


def _keras_to_torch_names() -> dict[str, str]:
    """TensorFlow variable name (``conv2d/kernel``) -> torch state-dict key (``stem.0.weight``)."""
    names = {}
    for path, conv_name, bn_name in KERAS_CONV_BN:
        kernel = "depthwise_kernel" if path.endswith(_DEPTHWISE_POSITIONS) else "kernel"
        names[f"{conv_name}/{kernel}"] = f"{path}.0.weight"
        names[f"{conv_name}/bias"] = f"{path}.0.bias"
        for suffix, param in _BN_VARIABLES.items():
            names[f"{bn_name}/{suffix}"] = f"{path}.1.{param}"
    names[f"{KERAS_CLASSIFIER}/kernel"] = "classifier.weight"
    names[f"{KERAS_CLASSIFIER}/bias"] = "classifier.bias"
    return names


def _to_torch_layout(name: str, array: NDArray[np.float32]) -> Tensor:
    """A TensorFlow weight in torch's layout.

    Conv kernels are ``(kh, kw, in, out)`` in TF and ``(out, in, kh, kw)`` in torch; depthwise
    kernels ``(kh, kw, channels, 1)`` become ``(channels, 1, kh, kw)``.
    """
    tensor = torch.from_numpy(array.copy())
    if name.endswith("/depthwise_kernel"):
        return tensor.permute(2, 3, 0, 1).contiguous()
    if name.endswith("/kernel"):
        return tensor.permute(3, 2, 0, 1).contiguous()
    return tensor


def load_savedmodel_weights(model: DynamicWorld, contents: SavedModelContents) -> None:
    """Copy the SavedModel's weights into ``model`` (in place), checking the architecture first.

    Raises:
        ModelCardError: If the SavedModel's layers, variables or shapes do not fit the port.
    """
    if contents.keras_layers:
        _check_keras_config(model, contents.keras_layers)
    else:  # the weight names and shapes below still pin the architecture down
        log.warning("the SavedModel has no Keras metadata: layer configs not checked")
    names = _keras_to_torch_names()
    missing = sorted(set(names) - set(contents.variables))
    unused = sorted(set(contents.variables) - set(names))
    if missing or unused:
        raise ModelCardError(
            f"the SavedModel's variables do not fit the Dynamic World port: missing {missing}, "
            f"unexpected {unused}"
        )
    state = model.state_dict()
    with torch.no_grad():
        for tf_name, torch_name in names.items():
            value = _to_torch_layout(tf_name, contents.variables[tf_name])
            if value.shape != state[torch_name].shape:
                raise ModelCardError(
                    f"{tf_name}: shape {tuple(value.shape)} does not fit {torch_name} "
                    f"{tuple(state[torch_name].shape)}"
                )
            state[torch_name].copy_(value)


def _hex_color(value: str) -> tuple[int, int, int]:
    return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))


def dynamicworld_card() -> ModelCard:
    """The model card of the published Dynamic World model."""
    return ModelCard(
        name="dynamicworld",
        arch=ARCH_NAME,
        total_stride=DynamicWorld.total_stride,
        bands=list(BANDS),
        input_dtypes=["uint16"],
        normalization=Normalization(named="dynamicworld"),
        classes=[
            ClassInfo(id=i, name=name, color=_hex_color(color))
            for i, (name, color) in enumerate(CLASSES)
        ],
        tile_size=TILE_SIZE,
        overlap=OVERLAP,
        # bf16 autocast changed 0.05-2.2% of pixels on the Slovenia scenes (CPU) and 0.5-1.1% on
        # an H100 (benchmarks/README.md): more than the 0.1% a precision option may change.
        precisions=["fp32"],
        description=(
            "Dynamic World V1 land use / land cover (Brown et al. 2022, Scientific Data 9, 251), "
            "imported from Google's TensorFlow SavedModel (github.com/google/dynamicworld, "
            "Apache-2.0). Input: Sentinel-2 L1C top-of-atmosphere digital numbers "
            "(reflectance x 10000) at 10 m."
        ),
    )


def import_dynamicworld(savedmodel_dir: Path, out: Path, *, overwrite: bool = False) -> ModelCard:
    """Convert Google's Dynamic World SavedModel into a geoseg model directory (no TensorFlow).

    Args:
        savedmodel_dir: The SavedModel folder (``forward/`` of the published model).
        out: Model directory to write (``model.yaml`` and ``weights.safetensors``).
        overwrite: Replace an existing model directory.

    Returns:
        The card written.

    Raises:
        ModelCardError: If the SavedModel is unreadable or does not fit the port.
        OutputExistsError: If ``out`` holds a model and ``overwrite`` is false.
    """
    # Imported here: store imports the registry, which imports this module.
    from geoseg.models.store import save_model

    model = DynamicWorld()
    load_savedmodel_weights(model, read_savedmodel(savedmodel_dir))
    card = dynamicworld_card()
    save_model(model.eval(), card, out, overwrite=overwrite)
    return card


__all__ = [
    "ARCH_NAME",
    "BANDS",
    "CLASSES",
    "NORM_SHIFT_SCALE",
    "ConvBNMish",
    "DynamicWorld",
    "SavedModelContents",
    "SeparableResidualBlock",
    "dynamicworld_card",
    "import_dynamicworld",
    "load_savedmodel_weights",
    "normalize_dynamicworld",
    "read_savedmodel",
]
