"""Where int8 gains and where it cannot: `ssd bench infer --precision int8 --breakdown`.

Two tables for one architecture, ours in bf16 (`auto`) against ours in int8, on the same batch:
- stages: preprocessing (resize, normalise), the network (backbone and head) and post-processing, each
  timed alone; only the network differs between the two copies.
- convolutions by kind: every convolution of each copy called alone on the input it receives in a real
  pass (bf16: the oneDNN call with its activation fused; int8: the quantized module FX built), summed
  by kind (dense k x k, pointwise 1x1, depthwise); what the network spends outside them is the rest
  (int8: Hardswish, squeeze-excitation products, additions, (de)quantization).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ssd_core.bench.speed import alternate, int8_copy, random_images, torchvision_pair
from ssd_core.inference import FusedConvActivation, optimize_for_inference
from ssd_core.postprocess import postprocess

KINDS = ("dense", "pointwise", "depthwise")


def conv_kind(in_channels: int, groups: int, kernel_size: tuple[int, ...]) -> str:
    """"depthwise" (one filter per channel), "pointwise" (1x1) or "dense" (k x k over all channels)."""
    if groups > 1 and groups == in_channels:
        return "depthwise"
    return "pointwise" if tuple(kernel_size) == (1, 1) else "dense"


def _convolutions(network: nn.Module) -> list[tuple[nn.Module, str]]:
    """The convolution modules a pass of `network` calls (bf16 copy or FX int8 graph), with their kind."""
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

    fused = [m for m in network.modules() if isinstance(m, FusedConvActivation)]
    inner = {id(m.conv) for m in fused}  # called by their FusedConvActivation, timed with it
    found = []
    for module in network.modules():
        conv = module.conv if isinstance(module, FusedConvActivation) else module
        if isinstance(conv, (nn.Conv2d, QuantizedConv2d)) and id(module) not in inner:
            found.append((module, conv_kind(conv.in_channels, conv.groups, conv.kernel_size)))
    return found


def _captured_calls(run: Callable[[], Any], modules: list[tuple[nn.Module, str]]) -> list[tuple[Callable[[], Any], str]]:
    """One zero-argument call per module invocation in `run()`, replaying it on the input it received."""
    calls: list[tuple[Callable[[], Any], str]] = []
    handles = []
    for module, kind in modules:
        def hook(mod, args, _kind=kind):
            calls.append(((lambda m=mod, a=args: m(*a)), _kind))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def bench_breakdown(arch: str, *, batch_size: int = 16, repeats: int = 5, height: int = 480,
                    width: int = 640) -> dict[str, Any]:
    """Stages and convolutions by kind of ours in bf16 (`auto` on this CPU) and int8, same weights and
    batch (random weights as `bench_infer`'s, int8 calibrated on another batch). CPU only."""
    _, ours = torchvision_pair(arch)
    ours.eval()
    images = random_images(batch_size, height, width)
    copies = {"bf16": optimize_for_inference(ours, "auto"),
              "int8": int8_copy(ours, random_images(batch_size, height, width, seed=1))}
    stage_times: dict[str, list[float]] = {}
    kind_seconds: dict[str, dict[str, float]] = {}
    layer_counts: dict[str, dict[str, int]] = {}
    with torch.inference_mode():
        batch, original = copies["bf16"].preprocess(images)
        for name, model in copies.items():
            head, anchors = model.forward_head(batch)
            times = alternate({
                "preprocess": lambda m=model: m.preprocess(images),
                "network": lambda m=model: m.forward_head(batch),
                "postprocess": lambda m=model, h=head, a=anchors: postprocess(
                    h["cls_logits"], h["bbox_regression"], a, m.size, original, m.postprocess_config, m.box_weights),
            }, repeats)
            for stage, samples in times.items():
                stage_times[f"{name}/{stage}"] = samples
            network = model.int8_network if name == "int8" else nn.ModuleList([model.backbone, model.head])
            calls = _captured_calls(lambda m=model: m.forward_head(batch), _convolutions(network))
            per_call = alternate({str(i): call for i, (call, _) in enumerate(calls)}, repeats)
            kind_seconds[name] = {kind: 0.0 for kind in KINDS}
            layer_counts[name] = {kind: 0 for kind in KINDS}
            for i, (_, kind) in enumerate(calls):
                kind_seconds[name][kind] += statistics.median(per_call[str(i)])
                layer_counts[name][kind] += 1

    def median(key: str) -> float:
        return statistics.median(stage_times[key])

    stages = [{"stage": stage, "bf16_s": median(f"bf16/{stage}"), "int8_s": median(f"int8/{stage}"),
               "int8_speedup": median(f"bf16/{stage}") / median(f"int8/{stage}")}
              for stage in ("preprocess", "network", "postprocess")]
    kinds = []
    for kind in KINDS:
        if layer_counts["bf16"][kind]:
            bf16, int8 = kind_seconds["bf16"][kind], kind_seconds["int8"][kind]
            kinds.append({"part": f"{kind} convolutions", "layers": layer_counts["int8"][kind], "bf16_s": bf16,
                          "int8_s": int8, "int8_speedup": bf16 / int8})
    rest = {name: median(f"{name}/network") - sum(kind_seconds[name].values()) for name in copies}
    kinds.append({"part": "rest of the network", "layers": 0, "bf16_s": rest["bf16"], "int8_s": rest["int8"],
                  "int8_speedup": rest["bf16"] / rest["int8"] if rest["int8"] > 0 else float("nan")})
    total = {name: sum(median(f"{name}/{s}") for s in ("preprocess", "network", "postprocess")) for name in copies}
    return {"arch": arch, "batch_size": batch_size, "image_size": [height, width],
            "threads": torch.get_num_threads(), "stages": stages, "network_parts": kinds,
            "ratio_int8_vs_bf16_stages_summed": total["bf16"] / total["int8"],
            "layers_bf16": layer_counts["bf16"], "layers_int8": layer_counts["int8"]}
