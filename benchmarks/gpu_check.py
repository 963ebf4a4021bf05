"""GPU check: geoseg's models and CRF on CUDA; what mixed precision costs in class agreement.

Self-contained on purpose: it imports only ``geoseg.models``, ``geoseg.engine.predict``,
``geoseg.crf``, ``geoseg.crf_local`` and torch/numpy (plus what those import: safetensors, yaml,
pydantic), not Ray or rasterio, so it runs on a bare GPU box.
Its settings mirror ``geoseg.engine.predict.Predictor`` (normalise on the device, autocast, softmax
in float32, class = argmax); the ``actor-*`` rows time the Predictor itself (numpy in, float16
probabilities back on the host, as the actor returns them).

For each model directory given:

1. Class maps on "realistic" random inputs (smooth, band-correlated fields in the value range of
   the real tiles) and on real tiles saved beforehand as ``.npy`` (``(N, bands, H, W)``, raw values
   in the card's band order; a file is used for every model whose band count and input dtype fit).
2. Agreement (% of pixels with the same class): fp32 CPU vs fp32 CUDA (PyTorch's default, where
   cuDNN convolutions may use TF32, and strict fp32 with TF32 off), and CUDA fp32 vs bf16 / fp16
   autocast, each also with channels_last.
3. Throughput on CUDA (MP/s = 1e6 input pixels per second; input already on the GPU, timed from
   the raw tensor to the class map: normalisation, forward, softmax, argmax), per batch size and
   setting; optionally ``torch.compile``.
4. The CRF (``geoseg.crf_local.crf_refine``) on CUDA vs CPU: max |diff| of the refined
   probabilities and class-map agreement, with some invalid pixels, on one model's probabilities.

Usage::

    python benchmarks/gpu_check.py MODEL_DIR [MODEL_DIR ...] [--tiles DIR] [--out FILE.json]
        [--batches 8,16,32] [--tile 512] [--compile] [--quick]

Prints a table and writes JSON to ``--out`` (default ``$OUT/gpu_check.json`` when ``$OUT`` is set,
else ``benchmarks/out/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geoseg.crf import CRFParams
from geoseg.crf_local import crf_refine
from geoseg.engine.predict import Predictor
from geoseg.models.card import ModelCard
from geoseg.models.store import load_model, normalize

# name -> (autocast dtype or None, channels_last, allow TF32 in cuDNN convolutions)
SETTINGS: dict[str, tuple[torch.dtype | None, bool, bool]] = {
    "fp32": (None, False, True),  # PyTorch's default: cudnn.allow_tf32 is True
    "fp32-strict": (None, False, False),
    "fp32+cl": (None, True, True),
    "bf16": (torch.bfloat16, False, True),
    "bf16+cl": (torch.bfloat16, True, True),
    "fp16": (torch.float16, False, True),
    "fp16+cl": (torch.float16, True, True),
}
SPEED_SETTINGS = ["fp32", "fp32-strict", "bf16", "bf16+cl", "fp16+cl"]
AGREEMENT_GOAL = 99.9


def log(msg: str) -> None:
    print(msg, flush=True)


# --- inputs -----------------------------------------------------------------------------------


def value_range(card: ModelCard, real: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band 2nd/98th percentiles of the real tiles, else a plausible range for the dtype."""
    bands = len(card.bands)
    if real:
        stacked = np.concatenate([r.transpose(1, 0, 2, 3).reshape(bands, -1) for r in real], axis=1)
        lo, hi = np.percentile(stacked, 2, axis=1), np.percentile(stacked, 98, axis=1)
        return lo.astype(np.float64), np.maximum(hi, lo + 1).astype(np.float64)
    dtype = card.input_dtypes[0]
    lo, hi = {"uint8": (20, 230), "uint16": (300, 4000), "int16": (300, 4000)}.get(dtype, (0, 1))
    return np.full(bands, lo, dtype=np.float64), np.full(bands, hi, dtype=np.float64)


def realistic(
    batch: int, size: int, card: ModelCard, lo: np.ndarray, hi: np.ndarray, seed: int
) -> torch.Tensor:
    """Smooth random fields (objects tens of pixels wide), correlated across bands, raw dtype."""
    gen = torch.Generator().manual_seed(seed)
    bands = len(card.bands)
    coarse = max(size // 24, 2)

    def field(channels: int) -> torch.Tensor:
        low = torch.rand(batch, channels, coarse, coarse, generator=gen)
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)

    common = field(1)
    x = (
        0.6 * common
        + 0.4 * field(bands)
        + 0.03 * torch.randn(batch, bands, size, size, generator=gen)
    )
    x = (x - x.amin(dim=(2, 3), keepdim=True)) / (
        x.amax(dim=(2, 3), keepdim=True) - x.amin(dim=(2, 3), keepdim=True)
    )
    lo_t = torch.tensor(lo, dtype=torch.float32).view(1, -1, 1, 1)
    hi_t = torch.tensor(hi, dtype=torch.float32).view(1, -1, 1, 1)
    x = lo_t + x * (hi_t - lo_t)
    dtype = card.input_dtypes[0]
    if dtype == "float32":
        return x
    return x.round().to(getattr(torch, dtype))


def load_real(tiles_dir: Path | None, card: ModelCard) -> dict[str, np.ndarray]:
    """The ``.npy`` tiles whose band count and dtype fit the card."""
    found: dict[str, np.ndarray] = {}
    if tiles_dir is None or not tiles_dir.is_dir():
        return found
    for path in sorted(tiles_dir.glob("*.npy")):
        arr = np.load(path)
        if (
            arr.ndim == 4
            and arr.shape[1] == len(card.bands)
            and str(arr.dtype) in card.input_dtypes
        ):
            found[path.stem] = arr
    return found


# --- inference --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def set_tf32(allow: bool) -> None:
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default


def predict(
    model: torch.nn.Module,
    card: ModelCard,
    raw: torch.Tensor,
    device: torch.device,
    setting: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class map ``(B, H, W)`` and float32 probabilities ``(B, C, H, W)``, as the actor has them."""
    amp, channels_last, tf32 = SETTINGS[setting]
    if device.type == "cuda":
        set_tf32(tf32)
    x = normalize(raw.to(device), card)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with ctx:
        logits = model(x)
    probs = torch.softmax(logits.float(), dim=1)
    return probs.argmax(dim=1), probs


def model_for(base: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return base.to(device).to(memory_format=fmt)  # type: ignore[call-overload,no-any-return]


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() == b.cpu()).double().mean() * 100)


def margin(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability per pixel, ``(B, H, W)``."""
    top = probs.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def check_model(
    model_dir: Path,
    tiles_dir: Path | None,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    card, base, _ = load_model(model_dir)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "arch": card.arch,
        "bands": len(card.bands),
        "classes": card.num_classes,
        "params": sum(p.numel() for p in base.parameters()),
        "agreement": {},
        "speed": {},
        "errors": [],
    }
    real = load_real(tiles_dir, card)
    lo, hi = value_range(card, list(real.values()))
    inputs: dict[str, torch.Tensor] = {
        f"random{args.agree_size}": realistic(args.agree_batch, args.agree_size, card, lo, hi, 1)
    }
    for name, arr in real.items():
        inputs[name] = torch.from_numpy(np.ascontiguousarray(arr))
    log(
        f"\n== {model_dir} ({card.arch}, {result['params']} params); inputs: "
        + ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
    )

    with torch.inference_mode():
        cpu = torch.device("cpu")
        cpu_model = model_for(base, cpu, False)
        ref_cpu = {k: predict(cpu_model, card, v, cpu, "fp32") for k, v in inputs.items()}
        result["_cpu_probs_for_crf"] = (inputs, ref_cpu)
        if device.type == "cpu" and not args.full_on_cpu:
            return result
        maps: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for setting in SETTINGS:
            model = model_for(base, device, SETTINGS[setting][1])
            try:
                maps[setting] = {
                    k: predict(model, card, v, device, setting) for k, v in inputs.items()
                }
            except Exception as exc:  # noqa: BLE001 - report every failure, go on
                msg = f"{setting}: {type(exc).__name__}: {exc}"
                result["errors"].append(msg + "\n" + traceback.format_exc())
                log("   FAILED " + msg)
        for setting, per_input in maps.items():
            row: dict[str, Any] = {}
            for k, (cls, probs) in per_input.items():
                ref_cls, ref_probs = ref_cpu[k]
                gpu_cls, _ = maps.get("fp32", {}).get(k, (None, None))
                sure = margin(ref_probs) >= 0.02
                row[k] = {
                    "vs_cpu_fp32_pct": agree(cls, ref_cls),
                    "vs_cpu_fp32_margin_ge_0.02_pct": agree(
                        cls[sure.to(cls.device)], ref_cls[sure]
                    ),
                    "share_margin_lt_0.02_pct": float((~sure).double().mean() * 100),
                    "vs_cuda_fp32_pct": agree(cls, gpu_cls) if gpu_cls is not None else None,
                    "max_abs_prob_diff_vs_cpu": float((probs.cpu() - ref_probs).abs().max()),
                }
            result["agreement"][setting] = row

        # throughput
        set_tf32(True)
        extra = [f"actor-{p}" for p in card.precisions] + (
            ["bf16+cl+compile"] if args.compile else []
        )
        for setting in SPEED_SETTINGS + extra:
            compiled = setting.endswith("+compile")
            actor = setting.startswith("actor-")
            base_setting = setting.removesuffix("+compile").removeprefix("actor-")
            model = model_for(base, device, SETTINGS[base_setting][1])
            if compiled:
                if args.compile_failed:
                    continue
                model = torch.compile(model)  # type: ignore[assignment]
            result["speed"][setting] = {}
            batches = args.batches[len(args.batches) // 2 :][:1] if compiled else args.batches
            for batch in batches:
                try:
                    x = realistic(batch, args.tile, card, lo, hi, 2)
                    run = (
                        partial(
                            Predictor(model_dir, device.type, base_setting).probabilities,
                            x.numpy(),
                        )
                        if actor
                        else partial(predict, model, card, x.to(device), device, base_setting)
                    )

                    sync(device)
                    t0 = time.perf_counter()
                    run()
                    sync(device)
                    first = time.perf_counter() - t0
                    if compiled and first > args.compile_limit:
                        args.compile_failed = True
                        log(f"   compile took {first:.0f} s > {args.compile_limit} s: skipped")
                    for _ in range(2):
                        run()
                    sync(device)
                    reps, t0 = 0, time.perf_counter()
                    while reps < 3 or time.perf_counter() - t0 < args.min_time:
                        run()
                        reps += 1
                    sync(device)
                    secs = (time.perf_counter() - t0) / reps
                    mps = batch * args.tile * args.tile / secs / 1e6
                    result["speed"][setting][str(batch)] = {
                        "mp_per_s": mps,
                        "ms_per_batch": secs * 1e3,
                        "first_call_s": first,
                        "peak_mem_gib": peak_gib(device),
                    }
                    log(
                        f"   {setting:16s} batch {batch:3d}: {mps:8.1f} MP/s "
                        f"({secs * 1e3:7.1f} ms/batch, first call {first:.1f} s)"
                    )
                except Exception as exc:  # noqa: BLE001
                    msg = f"speed {setting} batch {batch}: {type(exc).__name__}: {exc}"
                    result["errors"].append(msg + "\n" + traceback.format_exc())
                    log("   FAILED " + msg)
                    if compiled:
                        args.compile_failed = True
                        break
                finally:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
            set_tf32(True)
        base.to("cpu")
    return result


# --- CRF --------------------------------------------------------------------------------------


def check_crf(
    model_result: dict[str, Any], model_dir: Path, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """crf_refine on CPU and CUDA, same probabilities (float16, as the actor passes them)."""
    card, _, _ = load_model(model_dir)
    inputs, ref = model_result["_cpu_probs_for_crf"]
    key = next(iter(inputs))
    raw = inputs[key][:1]
    probs = ref[key][1][0].to(torch.float16)  # (C, H, W), the actor's dtype
    features = normalize(raw.to(torch.float32), card)[0][:3]
    height, width = probs.shape[-2:]
    valid = torch.ones(height, width, dtype=torch.bool)
    valid[: height // 8] = False  # a nodata strip, and a few holes
    valid[height // 2 : height // 2 + 5, width // 3 : width // 3 + 40] = False
    features[:, ~valid] = float("nan")
    params = CRFParams()
    out: dict[str, Any] = {
        "model": str(model_dir),
        "input": key,
        "shape": [height, width],
        "params": params.__dict__,
    }
    with torch.inference_mode():
        t0 = time.perf_counter()
        q_cpu = crf_refine(probs, features, valid, params)
        out["cpu_s"] = time.perf_counter() - t0
        out["cpu_threads"] = torch.get_num_threads()
        if device.type == "cpu" and not args.full_on_cpu:
            return out
        try:
            # as the actor does: probs and valid moved to the device, features too
            q_gpu = crf_refine(probs.to(device), features.to(device), valid.to(device), params)
            sync(device)
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - t0 < 1.0:
                q_gpu = crf_refine(probs.to(device), features.to(device), valid.to(device), params)
                reps += 1
            sync(device)
            out["cuda_s"] = (time.perf_counter() - t0) / reps
            out["max_abs_diff"] = float((q_gpu.cpu() - q_cpu).abs().max())
            out["class_agreement_pct"] = agree(
                q_gpu.argmax(0)[valid.to(device)], q_cpu.argmax(0)[valid]
            )
            out["invalid_zero_cuda"] = bool((q_gpu.cpu()[:, ~valid] == 0).all())
            out["dtype_cuda"] = str(q_gpu.dtype)
            # mixed devices: features left on the CPU (crf_refine moves them), valid on the CPU
            q_mixed = crf_refine(probs.to(device), features, valid, params)
            out["mixed_devices_ok"] = bool(torch.equal(q_mixed, q_gpu))
            # a larger batch for throughput: (4, C, 1024, 1024)
            big = probs.float().repeat(4, 1, 1024 // height + 1, 1024 // width + 1)[
                ..., :1024, :1024
            ]
            fbig = torch.nan_to_num(features).repeat(4, 1, 1024 // height + 1, 1024 // width + 1)[
                ..., :1024, :1024
            ]
            vbig = torch.ones(4, 1024, 1024, dtype=torch.bool)
            big, fbig, vbig = big.to(device), fbig.to(device), vbig.to(device)
            crf_refine(big, fbig, vbig, params)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(3):
                crf_refine(big, fbig, vbig, params)
            sync(device)
            out["cuda_mp_per_s_4x1024"] = 4 * 1024 * 1024 / ((time.perf_counter() - t0) / 3) / 1e6
            out["cuda_peak_mem_gib_4x1024"] = peak_gib(device)
        except Exception as exc:  # noqa: BLE001
            out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            log("   CRF FAILED " + out["error"])
    out["cpu_mp_per_s"] = height * width / out["cpu_s"] / 1e6
    return out


# --- main -------------------------------------------------------------------------------------


def print_tables(report: dict[str, Any]) -> None:
    log("\n### Class-map agreement (% of pixels) vs CPU fp32 / vs CUDA fp32 (TF32 convs)")
    for m in report["models"]:
        log(f"\n{Path(m['model']).name} ({m['arch']})")
        for setting, row in m["agreement"].items():
            cells = []
            for k, v in row.items():
                b = v["vs_cuda_fp32_pct"]
                cells.append(
                    f"{k}: {v['vs_cpu_fp32_pct']:.3f} / {b:.3f}"
                    if b is not None
                    else f"{k}: {v['vs_cpu_fp32_pct']:.3f}"
                )
            log(f"  {setting:12s} " + " | ".join(cells))
        for setting, row in m["agreement"].items():
            log(
                f"  {setting:12s} margin>=0.02 vs CPU: "
                + " | ".join(
                    f"{k}: {v['vs_cpu_fp32_margin_ge_0.02_pct']:.3f} "
                    f"(low-margin {v['share_margin_lt_0.02_pct']:.2f}%)"
                    for k, v in row.items()
                )
            )
        for e in m["errors"]:
            log("  ERROR " + e.splitlines()[0])
    log(f"\n### Throughput on CUDA (MP/s), tile {report['tile']}")
    batches = report["batches"]
    log(f"  {'model':14s} {'setting':16s} " + " ".join(f"b{b:<7d}" for b in batches))
    for m in report["models"]:
        for setting, per in m["speed"].items():
            cells = [
                f"{per[str(b)]['mp_per_s']:8.1f}" if str(b) in per else "     n/a" for b in batches
            ]
            log(f"  {Path(m['model']).name:14s} {setting:16s} " + " ".join(cells))
    crf = report.get("crf")
    if crf:
        log("\n### CRF (crf_refine) CUDA vs CPU")
        log("  " + json.dumps({k: v for k, v in crf.items() if k != "params"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--tiles", type=Path, default=Path(".gpucheck/tiles"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--agree-batch", type=int, default=4)
    parser.add_argument("--agree-size", type=int, default=512)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds timed per cell")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (bf16+cl)")
    parser.add_argument("--compile-limit", type=float, default=120.0)
    parser.add_argument("--crf-model", type=int, default=0, help="index of the model for the CRF")
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke test)")
    parser.add_argument(
        "--full-on-cpu",
        action="store_true",
        help="without CUDA, still run every setting on the CPU (to test this script)",
    )
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.compile_failed = False
    if args.quick:
        args.batches, args.tile, args.agree_batch, args.agree_size = [2], 128, 2, 128
    if args.out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("benchmarks/out")
        args.out = base / "gpu_check.json"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "tile": args.tile,
        "batches": args.batches,
        "models": [],
    }
    log(
        f"device {report['device']}, torch {torch.__version__}, {report['cpu_threads']} CPU threads"
    )

    def dump() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        clean = dict(report)
        clean["models"] = [
            {k: v for k, v in m.items() if k != "_cpu_probs_for_crf"} for m in report["models"]
        ]
        args.out.write_text(json.dumps(clean, indent=2))

    for model_dir in args.models:
        dump()
        try:
            report["models"].append(check_model(model_dir, args.tiles, device, args))
        except Exception as exc:  # noqa: BLE001
            log(f"FAILED {model_dir}: {exc}\n{traceback.format_exc()}")
            report["models"].append(
                {
                    "model": str(model_dir),
                    "arch": "?",
                    "agreement": {},
                    "speed": {},
                    "errors": [traceback.format_exc()],
                }
            )
    if report["models"] and "_cpu_probs_for_crf" in report["models"][args.crf_model]:
        report["crf"] = check_crf(
            report["models"][args.crf_model], args.models[args.crf_model], device, args
        )
    for m in report["models"]:
        m.pop("_cpu_probs_for_crf", None)
    print_tables(report)
    dump()
    log(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
