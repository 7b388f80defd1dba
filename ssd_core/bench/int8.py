"""Where int8 gains: `ssd bench infer --precision int8 --breakdown`.

Ours in bf16 (`auto`) against ours in int8 on the same batch, stage by stage: preprocessing (resize,
normalise), the network (backbone and head; int8: the compiled quantized graph) and post-processing,
each timed alone. Only the network differs between the two copies; the other stages are the same fp32
code and bound what int8 can gain on the whole pass. Within the network, the convolution kernels'
time by kind (depthwise, 1x1, full), read from the profiler's records of the oneDNN calls, whose
weight shapes and groups say the kind.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ssd_core.bench.speed import alternate, int8_copy, random_images, torchvision_pair
from ssd_core.inference import optimize_for_inference
from ssd_core.postprocess import postprocess

STAGES = ("preprocess", "network", "postprocess")
KINDS = ("depthwise", "pointwise 1x1", "full kxk")
# The convolution kernels each copy calls (leaves in the profiler's tree) and where their weight is.
_CONV_WEIGHT_ARG = {"mkldnn::_convolution_pointwise": 1, "aten::mkldnn_convolution": 1,
                    "onednn::qconv_pointwise": 3, "onednn::qconv2d_pointwise": 3}


def bench_breakdown(arch: str, *, batch_size: int = 16, repeats: int = 5, height: int = 480,
                    width: int = 640) -> dict[str, Any]:
    """Stages of ours in bf16 (`auto` on this CPU) and int8, same weights and batch (random weights as
    `bench_infer`'s, int8 calibrated on another batch). CPU only."""
    _, ours = torchvision_pair(arch)
    ours.eval()
    images = random_images(batch_size, height, width)
    copies = {"bf16": optimize_for_inference(ours, "auto"),
              "int8": int8_copy(ours, random_images(batch_size, height, width, seed=1))}
    stage_times: dict[str, list[float]] = {}
    with torch.inference_mode():
        batch, original = copies["bf16"].preprocess(images)
        for name, model in copies.items():
            head, anchors = model.forward_head(batch)  # int8: compiles its network (warm-up, not timed)
            times = alternate({
                "preprocess": lambda m=model: m.preprocess(images),
                "network": lambda m=model: m.forward_head(batch),
                "postprocess": lambda m=model, h=head, a=anchors: postprocess(
                    h["cls_logits"], h["bbox_regression"], a, m.size, original, m.postprocess_config, m.box_weights),
            }, repeats)
            for stage, samples in times.items():
                stage_times[f"{name}/{stage}"] = samples

        kinds = {name: conv_time_by_kind(model, batch, repeats) for name, model in copies.items()}

    def median(key: str) -> float:
        return statistics.median(stage_times[key])

    stages = [{"stage": stage, "bf16_s": median(f"bf16/{stage}"), "int8_s": median(f"int8/{stage}"),
               "int8_speedup": median(f"bf16/{stage}") / median(f"int8/{stage}")} for stage in STAGES]
    total = {name: sum(median(f"{name}/{stage}") for stage in STAGES) for name in copies}
    convolutions = [{"convolutions": kind, "count": kinds["int8"][kind][1], "bf16_s": kinds["bf16"][kind][0],
                     "int8_s": kinds["int8"][kind][0], "int8_speedup": kinds["bf16"][kind][0] / kinds["int8"][kind][0]}
                    for kind in KINDS if kinds["int8"][kind][1]]
    return {"arch": arch, "batch_size": batch_size, "image_size": [height, width],
            "threads": torch.get_num_threads(), "stages": stages, "convolutions": convolutions,
            "ratio_int8_vs_bf16_stages_summed": total["bf16"] / total["int8"],
            "int8_compiled_batch_size": copies["int8"].int8_network.batch_size}


def conv_time_by_kind(model, batch: torch.Tensor, repeats: int) -> dict[str, tuple[float, int]]:
    """Seconds per pass spent in `model`'s convolution kernels, and their count, per kind (`KINDS`),
    over `repeats` profiled passes of `forward_head`: a convolution is depthwise when each group has one
    input channel, pointwise when its kernel is 1x1, full otherwise."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            model.forward_head(batch)
    totals = {kind: [0.0, 0] for kind in KINDS}
    for event in prof.events():
        if event.name not in _CONV_WEIGHT_ARG:
            continue
        in_channels = event.input_shapes[0][1]
        _, in_per_group, kh, kw = event.input_shapes[_CONV_WEIGHT_ARG[event.name]]
        kind = KINDS[0] if in_per_group == 1 < in_channels else KINDS[1] if kh == kw == 1 else KINDS[2]
        totals[kind][0] += event.cpu_time_total / 1e6 / repeats
        totals[kind][1] += 1
    return {kind: (seconds, count // repeats) for kind, (seconds, count) in totals.items()}
