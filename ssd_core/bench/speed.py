"""Side-by-side benchmarks against torchvision's implementation of the same architecture, on the CPU
or a CUDA device.

Every figure is measured in one process, on the same inputs and thread count, with the variants
run in alternating repetitions so that drift in machine load hits them alike; we report medians
and ratios, never a single timing. On a GPU each timed call ends with a device synchronisation.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssd_core.allocator import tune_allocator
from ssd_core.inference import compile_network, optimize_for_inference
from ssd_core.postprocess import postprocess
from ssd_core.precision import autocast, resolve_precision
from ssd_core.zoo import CONFIGS

# torchvision builders for the architectures it also implements.
TORCHVISION_ARCHS = {arch: config.torchvision_builder for arch, config in CONFIGS.items() if config.torchvision_builder}


def torchvision_pair(arch: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torchvision's model with random weights and ours loaded from its state_dict."""
    import torchvision

    from ssd_core.zoo import build_model

    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"torchvision has no {arch}; side-by-side runs for {', '.join(TORCHVISION_ARCHS)}")
    torch.manual_seed(seed)
    reference = getattr(torchvision.models.detection, TORCHVISION_ARCHS[arch])(
        weights=None, weights_backbone=None, num_classes=91
    )
    if arch.startswith("ssdlite"):
        # torchvision's N(0, 0.03) init gives every box the score 1/91 exactly: a degenerate input
        # for post-processing. He init spreads the scores as a trained model's are (both models
        # get the same weights, so the comparison stays like for like).
        with torch.no_grad():
            for module in reference.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.pt"
        torch.save(reference.state_dict(), path)
        ours = build_model(arch, weights=str(path))
    return reference, ours


def random_images(batch_size: int, height: int = 480, width: int = 640, seed: int = 0,
            device: torch.device | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, height, width, generator=g).to(device) for _ in range(batch_size)]


def _targets(batch_size: int, height: int = 480, width: int = 640, seed: int = 0,
             device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(batch_size):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = 20 + torch.rand(4, 2, generator=g) * torch.tensor([width * 0.35, height * 0.35])
        out.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                    "labels": torch.randint(1, 91, (4,), generator=g).to(device)})
    return out


def synthetic_jpegs(count: int, *, height: int = 480, width: int = 640, seed: int = 0) -> list[bytes]:
    """`count` synthetic JPEGs (coloured rectangles on a gradient, quality 90), deterministic."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    out = []
    for _ in range(count):
        base = (ramp * rng.uniform(0.2, 1.0, 3)[None, None, :]).repeat(height, axis=0).astype(np.uint8)
        image = Image.fromarray(base)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, width - 80), rng.integers(0, height - 80)
            w, h = rng.integers(30, 200, 2)
            draw.rectangle([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def synchronizer(device: torch.device | str) -> Callable[[], None] | None:
    """What ends a timed call on ``device``: waiting for its queued kernels (CUDA), nothing on the CPU."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def alternate(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
              synchronize: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved: v1, v2, ..., v1, v2, ...; ``synchronize`` (see
    `synchronizer`) runs inside each timed call, after the variant."""
    sync = synchronize or (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], images_per_call: int, anchor: str) -> list[dict[str, Any]]:
    base = statistics.median(times[anchor])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({
            "variant": name,
            "median_s": median,
            "images_per_s": images_per_call / median,
            "speedup_vs_" + anchor: base / median,
            "repeats": len(samples),
        })
    return rows


def _autocast_precision(auto: str) -> str:
    """What torchvision's model gets autocast to beside our ``auto``: the same, or bf16 where auto is fp32
    (a CPU without fast bf16, where torchvision's bf16 autocast is still the figure to compare with)."""
    return auto if auto != "fp32" else "bf16"


def bench_infer(arch: str, *, batch_size: int = 4, repeats: int = 5, height: int = 480, width: int = 640,
                device: torch.device | str = "cpu", compile: bool = False, postprocess: bool = True,
                warmup: int = 1, int8: bool = False) -> dict[str, Any]:
    """End-to-end eval forward (resize, network, post-processing) on ``device`` of torchvision fp32,
    torchvision under bf16/fp16 autocast + channels_last, ours fp32 and ours with precision="auto"
    (`optimize_for_inference`); with ``compile`` also that copy with its network compiled
    (`compile_network`; warm-up calls compile it). With ``postprocess``, post-processing alone on the same
    head outputs too. With ``int8`` also ours in int8 (`ssd_core.quantize`, calibrated on other random images
    of the same kind; CPU). Both sides run with the malloc settings bulk detection uses (`ssd_core.allocator`)."""
    tune_allocator()
    device = torch.device(device)
    reference, ours = torchvision_pair(arch)
    reference.eval().to(device)
    ours.eval().to(device)
    images = random_images(batch_size, height, width, device=device)
    auto = resolve_precision("auto", device)
    amp = _autocast_precision(auto)
    ours_auto = optimize_for_inference(ours, "auto", device)
    reference_amp = _clone_channels_last(reference)
    ours_int8 = int8_copy(ours, random_images(batch_size, height, width, seed=1)) if int8 else None

    def run(model, precision: str = "fp32"):
        def call():
            with torch.inference_mode(), autocast(precision, device):
                model(images)
        return call

    auto_name = f"ssd_core_auto({auto})"
    variants = {"torchvision_fp32": run(reference), f"torchvision_{amp}_autocast": run(reference_amp, amp),
                "ssd_core_fp32": run(ours), auto_name: run(ours_auto)}
    if compile:
        variants[f"{auto_name}+compile"] = run(compile_network(optimize_for_inference(ours, "auto", device)))
    if int8:
        variants["ssd_core_int8"] = run(ours_int8)
    times = alternate(variants, repeats, warmup=warmup, synchronize=synchronizer(device))
    rows = summarise(times, batch_size, "torchvision_fp32")
    auto_median = statistics.median(times[auto_name])
    result = {
        "arch": arch, "batch_size": batch_size, "image_size": [height, width], "threads": torch.get_num_threads(),
        "device": str(device), "precision": auto, "rows": rows,
        "ratio_auto_vs_torchvision_fp32": statistics.median(times["torchvision_fp32"]) / auto_median,
        "ratio_auto_vs_torchvision_autocast": statistics.median(times[f"torchvision_{amp}_autocast"]) / auto_median,
    }
    if int8:
        result["ratio_int8_vs_torchvision_fp32"] = statistics.median(times["torchvision_fp32"]) / statistics.median(times["ssd_core_int8"])
        result["ratio_int8_vs_auto"] = auto_median / statistics.median(times["ssd_core_int8"])
    if postprocess:
        result["postprocess"] = bench_postprocess(reference, ours, images, repeats=max(repeats, 5))
    return result


def bench_postprocess(reference, ours, images, *, repeats: int = 5) -> dict[str, Any]:
    """Post-processing alone (decode, filter, NMS, rescale) on identical head outputs."""
    with torch.inference_mode():
        batch, original = ours.preprocess(images)
        head, anchors = ours.forward_head(batch)
    image_sizes = [tuple(ours.size)] * len(images)
    original_sizes = [tuple(s) for s in original.tolist()]
    tv_anchors = [anchors] * len(images)

    def tv():
        with torch.inference_mode():
            dets = reference.postprocess_detections(head, tv_anchors, image_sizes)
            reference.transform.postprocess(dets, image_sizes, original_sizes)

    def mine():
        with torch.inference_mode():
            postprocess(head["cls_logits"], head["bbox_regression"], anchors, ours.size, original,
                        ours.postprocess_config, ours.box_weights)

    times = alternate({"torchvision": tv, "ssd_core": mine}, repeats, synchronize=synchronizer(batch.device))
    return {"rows": summarise(times, len(images), "torchvision"),
            "ratio": statistics.median(times["torchvision"]) / statistics.median(times["ssd_core"])}


def bench_train(arch: str, *, batch_size: int = 4, repeats: int = 5, height: int = 480, width: int = 640,
                device: torch.device | str = "cpu", warmup: int = 1) -> dict[str, Any]:
    """One SGD step (forward, loss, backward, update) on ``device`` of torchvision fp32 and under bf16/fp16
    autocast (its recipe's mixed precision, on its own copy of the weights; channels_last on a GPU, as its
    reference scripts train with --amp) vs ours fp32 and "auto" (the plain network in its precision, as
    training runs it). fp16 steps go through a GradScaler, as in training."""
    device = torch.device(device)
    reference, ours = torchvision_pair(arch)
    auto = resolve_precision("auto", device)
    amp = _autocast_precision(auto)
    ours_auto = _clone_with_precision(ours, "auto")  # trained: the plain network
    images, targets = random_images(batch_size, height, width, device=device), _targets(batch_size, height, width, device=device)

    def stepper(model, autocast_precision: str = "fp32", precision: str = "fp32"):
        model.to(device).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled="fp16" in (autocast_precision, precision))

        def step():
            with autocast(autocast_precision, device):
                losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return step

    auto_name = f"ssd_core_auto({auto})"
    reference_amp = _clone_channels_last(reference) if device.type == "cuda" else copy.deepcopy(reference)
    variants = {"torchvision_fp32": stepper(reference), f"torchvision_{amp}_autocast": stepper(reference_amp, amp),
                "ssd_core_fp32": stepper(ours), auto_name: stepper(ours_auto, precision=auto)}
    times = alternate(variants, repeats, warmup=warmup, synchronize=synchronizer(device))
    auto_median = statistics.median(times[auto_name])
    return {"arch": arch, "batch_size": batch_size, "device": str(device), "precision": auto,
            "rows": summarise(times, batch_size, "torchvision_fp32"),
            "ratio_auto_vs_torchvision_fp32": statistics.median(times["torchvision_fp32"]) / auto_median,
            "ratio_auto_vs_torchvision_autocast": statistics.median(times[f"torchvision_{amp}_autocast"]) / auto_median}


def int8_copy(model, calibration_images: list[torch.Tensor]):
    """An int8 inference copy of ``model`` calibrated on ``calibration_images``; ``model`` stays fp32."""
    from ssd_core.quantize import calibrate

    calibrated = copy.deepcopy(model)
    with torch.no_grad():
        calibrate(calibrated, [calibrated.preprocess(calibration_images)[0]])
    return optimize_for_inference(calibrated, "int8")


def _clone_with_precision(model, precision: str):
    return copy.deepcopy(model).set_precision(precision)


def _clone_channels_last(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def format_rows(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
