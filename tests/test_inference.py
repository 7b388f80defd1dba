"""optimize_for_inference: the copy prediction, evaluation, bulk detection and benchmarks run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssd_core import build_model
from ssd_core.inference import FusedConvActivation, _fused_conv_available, optimize_for_inference


def _he_init(model: nn.Module) -> None:
    for module in model.modules():  # activations of a realistic size all the way down
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)


@pytest.mark.parametrize("arch", ["ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "ssdlite300_mobilenet_v2"])
def test_bf16_inference_fuses_activations_into_convolutions(arch):
    if not _fused_conv_available(torch.bfloat16):
        pytest.skip("no oneDNN bf16 fused convolution on this CPU (needs AVX512); the plain modules run instead")
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5).eval()
    _he_init(model)
    batch, _ = model.preprocess([torch.rand(3, 240, 320), torch.rand(3, 300, 300)])
    optimized = optimize_for_inference(model, "bf16")
    with torch.no_grad():
        fused, _ = optimized.forward_head(batch)
        modules = [m for m in optimized.modules() if isinstance(m, FusedConvActivation)]
        assert len(modules) >= 10
        for module in modules:
            module.fused = False  # the same modules, convolution and activation run one after the other
        plain, _ = optimized.forward_head(batch)
        reference, _ = model.forward_head(batch)
    for key in ("cls_logits", "bbox_regression"):
        if arch != "ssdlite320_mobilenet_v3_large":  # ReLU and ReLU6 commute with rounding to bf16
            assert torch.equal(fused[key], plain[key])
        else:  # fused, Hardswish runs before the rounding to bf16 instead of after: no further from fp32
            fused_error = (fused[key] - reference[key]).abs().mean()
            plain_error = (plain[key] - reference[key]).abs().mean()
            assert fused_error <= 1.2 * plain_error, (fused_error, plain_error)


@pytest.mark.parametrize("arch", ["ssd300_vgg16", "ssdlite320_mobilenet_v3_large"])
def test_optimized_bf16_is_no_further_from_fp32_than_autocast_and_leaves_the_model_plain(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5).eval()
    _he_init(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch, _ = model.preprocess([torch.rand(3, 240, 320)])
    with torch.no_grad():
        reference, _ = model.forward_head(batch)
        autocast_out, _ = model.set_precision("bf16").forward_head(batch)
        optimized_out, _ = optimize_for_inference(model).forward_head(batch)
    for key in ("cls_logits", "bbox_regression"):
        autocast_error = (autocast_out[key] - reference[key]).abs().mean()
        optimized_error = (optimized_out[key] - reference[key]).abs().mean()
        assert optimized_error <= 1.5 * autocast_error + 1e-6, (key, optimized_error, autocast_error)
    # The source model keeps its modules and weights: BatchNorm unfolded, nothing fused, fp32.
    assert not any(isinstance(m, FusedConvActivation) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_fp32_copy_detects_like_the_model():
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=5).eval()
    _he_init(model)
    images = [torch.rand(3, 200, 260), torch.rand(3, 320, 320)]
    with torch.no_grad():
        expected = model(images)
        got = optimize_for_inference(model, "fp32")(images)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert torch.equal(a["labels"], b["labels"])


def test_compiled_network_detects_like_the_eager_copy():
    """torch.compile (its graph capture, run eagerly here: the GPU check compiles for real) of the
    backbone and head leaves pre- and post-processing as they were: the same detections."""
    from ssd_core.inference import compile_network

    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=5).eval()
    _he_init(model)
    with pytest.raises(ValueError, match="optimize_for_inference copy"):
        compile_network(model)
    images = [torch.rand(3, 200, 260), torch.rand(3, 200, 260)]
    eager = optimize_for_inference(model, "fp32")
    compiled = compile_network(optimize_for_inference(model, "fp32"), backend="eager")
    with torch.inference_mode():
        expected, got = eager(images), compiled(images)
    assert type(compiled.backbone).__name__ == "OptimizedModule"
    for a, b in zip(expected, got):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert torch.equal(a["labels"], b["labels"])
