"""Exported files (ONNX in onnxruntime, TorchScript in torch.jit) give the eager model's detections,
with a batch size other than the one they were exported with."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ssd_core import build_model
from ssd_core.cli import main as cli_main
from ssd_core.export import ExportableSSD, export_onnx, export_torchscript
from ssd_core.zoo import checkpoint_payload

ARCHS = ["ssdlite320_mobilenet_v3_large", "ssd300_vgg16"]
SCORE_THRESH = 0.6  # with the calibrated heads below: a few dozen detections per image


def _last_conv(predictor: torch.nn.Module) -> torch.nn.Conv2d:
    return [m for m in predictor.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def calibrated_model(arch: str, images: torch.Tensor):
    """A random model whose scores spread out without ties and whose boxes stay near their anchors.

    SSDLite's N(0, 0.03) init gives every class exactly 1/91 (ties make the order arbitrary), so its
    convolutions get He init as in test_parity; then each level's last head convolution is scaled so
    logits have std 1.7 and box codes std 0.5 on these images (a trained model's range).
    """
    torch.manual_seed(0)
    model = build_model(arch).eval()
    model.postprocess_config = replace(model.postprocess_config, score_thresh=SCORE_THRESH)
    with torch.no_grad():
        if arch.startswith("ssdlite"):
            for module in model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
        features = model.backbone(model.preprocess(list(images))[0])
        for head, target_std in ((model.head.classification_head, 1.7), (model.head.regression_head, 0.5)):
            for predictor, feature in zip(head.module_list, features):
                gain = target_std / float(predictor(feature).std())
                conv = _last_conv(predictor)
                conv.weight.mul_(gain)
                if conv.bias is not None:
                    conv.bias.mul_(gain)
    return model


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
    arch = request.param
    torch.manual_seed(1)
    size = (320, 320) if arch.startswith("ssdlite") else (300, 300)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    model = calibrated_model(arch, images)
    with torch.no_grad():
        expected = model.detect(*model.preprocess(list(images)))
    folder = tmp_path_factory.mktemp(arch)
    onnx_path = export_onnx(model, folder / "model.onnx", example_batch=1)
    script_path = export_torchscript(model, folder / "model.pt", example_batch=1)
    return arch, model, images, expected, onnx_path, script_path


def _check_against_eager(arch, expected, boxes, scores, labels, counts) -> None:
    assert boxes.shape[0] == len(expected) == 2, "the batch dimension must be dynamic"
    detections_per_img = boxes.shape[1]
    for b, eager in enumerate(expected):
        n = eager["boxes"].shape[0]
        assert 5 <= n < detections_per_img, f"{arch}: want a manageable, uncapped count, got {n}"
        assert eager["scores"].unique().numel() == n, "ties would make the order arbitrary"
        assert int(counts[b]) == n, f"{arch} image {b}"
        assert (np.diff(scores[b, :n]) <= 0).all(), "best first"
        # Runtimes differ by ~1e-5 in scores (other conv kernels), enough to swap two rows whose
        # scores are that close: pair each exported row with the eager row of the nearest box.
        distance = np.abs(boxes[b, :n, None, :] - eager["boxes"].numpy()[None]).max(-1)  # [n, n]
        match = distance.argmin(1)
        assert sorted(match.tolist()) == list(range(n)), f"{arch} image {b}: not one-to-one"
        # Boxes in pixels: the runtimes' kernels differ by up to ~2e-3 px on AVX2 CPUs (exp of the decoded
        # sizes amplifies the logit difference); a hundredth of a pixel still catches any real mistake.
        np.testing.assert_allclose(boxes[b, :n], eager["boxes"].numpy()[match], atol=1e-2, rtol=0)
        np.testing.assert_allclose(scores[b, :n], eager["scores"].numpy()[match], atol=5e-5, rtol=0)
        np.testing.assert_array_equal(labels[b, :n], eager["labels"].numpy()[match])
        # Padding rows are empty.
        assert not scores[b, n:].any() and not labels[b, n:].any() and not boxes[b, n:].any()


@pytest.mark.slow
def test_onnx_matches_eager_with_dynamic_batch(exported):
    import onnx
    import onnxruntime as ort

    arch, _, images, expected, onnx_path, _ = exported
    graph = onnx.load(str(onnx_path)).graph
    assert "NonMaxSuppression" in {node.op_type for node in graph.node}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels", "num_detections"]
    boxes, scores, labels, counts = session.run(None, {"images": images.numpy()})
    assert labels.dtype == np.int64 and counts.dtype == np.int64
    _check_against_eager(arch, expected, boxes, scores, labels, counts)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.load")
def test_torchscript_matches_eager_with_dynamic_batch(exported):
    arch, _, images, expected, _, script_path = exported
    loaded = torch.jit.load(str(script_path))
    with torch.no_grad():
        boxes, scores, labels, counts = (t.numpy() for t in loaded(images))
    _check_against_eager(arch, expected, boxes, scores, labels, counts)


def test_export_wrapper_leaves_the_model_alone():
    model = build_model("ssdlite320_mobilenet_v3_large", precision="bf16")
    wrapper = ExportableSSD(model)
    assert model.precision == "bf16", "the caller's model must not be switched to fp32"
    assert wrapper.anchors.shape == (3234, 4)  # ssdlite320: 6 maps x 6 boxes, fixed at export


def test_export_cli_and_errors(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3, class_names=["__background__", "a", "b"])
    weights = tmp_path / "ckpt.pt"
    torch.save(checkpoint_payload(model), weights)
    out = tmp_path / "m.onnx"
    assert cli_main(["export", "--weights", str(weights), "--format", "onnx", "--output", str(out)]) == 0
    assert out.stat().st_size > 1_000_000
    assert "boxes [B, 300, 4]" in capsys.readouterr().out

    assert cli_main(["export", "--weights", str(weights), "--format", "onnx", "--output", str(out),
                     "--opset", "10"]) == 1
    assert "opset 10 has no NonMaxSuppression" in capsys.readouterr().err
    assert cli_main(["export", "--weights", str(tmp_path / "missing.pt"), "--format", "onnx",
                     "--output", str(out)]) == 1
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown format
        cli_main(["export", "--weights", str(weights), "--format", "tflite", "--output", str(out)])
