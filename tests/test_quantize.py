"""int8 post-training quantization (ssd_core.quantize): calibration, the int8 copy optimize_for_inference
makes, int8 checkpoints (weights_only round trip), `ssd quantize`, and where int8 is refused.

Models are tiny (SSDLite at 96 px) with He-initialised convolutions, so activations have realistic
ranges all the way down; the fp32 network of the same weights is the reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ssd_core import build_model, list_models, load_model
from ssd_core.checkpoint import write_checkpoint
from ssd_core.cli import main as cli_main
from ssd_core.inference import optimize_for_inference
from ssd_core.quantize import OBSERVER, _prepare, calibrate
from ssd_core.zoo import checkpoint_payload, read_model_metadata

ARCH = "ssdlite320_mobilenet_v3_large"
SIZE = (96, 96)


def _tiny_model(num_classes: int = 4, class_names: list[str] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=num_classes, class_names=class_names, size=SIZE).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in")
    return model


def _images(count: int, seed: int) -> list[torch.Tensor]:
    """Smooth random images (blurred noise) of a few sizes: closer to photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for index in range(count):
        h, w = (72, 100) if index % 2 else (120, 90)
        coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
        images.append(nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0])
    return images


@pytest.fixture(scope="module")
def calibrated():
    """(fp32 model carrying its int8 calibration, its int8 copy)."""
    model = _tiny_model()
    with torch.no_grad():
        seen = calibrate(model, [model.preprocess(_images(8, seed=1))[0]])
    assert seen == 8 and model.int8_state is not None
    return model, optimize_for_inference(model, "int8")


def test_int8_copy_runs_quantized_convolutions_and_follows_fp32(calibrated):
    """Accuracy is measured on trained checkpoints (docs/benchmarks.md); a random network only shows that
    the int8 graph computes the same function: random deep networks amplify any rounding (1% noise on
    the input moves these head outputs by 5%), so int8 outputs differ by ~25% yet correlate ~0.97."""
    model, int8 = calibrated
    assert int8.effective_precision("cpu") == "int8" and int8.backbone is None
    graph = int8.int8_network.graph.graph
    convs = [n for n in graph.nodes if n.target is torch.ops.aten.conv2d.default]
    plain = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(plain) >= 40  # every convolution of backbone and head, BatchNorm folded in
    quantized = torch.ops.quantized_decomposed
    for conv in convs:  # int8 input (per tensor) and weight (per channel): oneDNN's int8 convolution once compiled
        assert conv.args[0].target is quantized.dequantize_per_tensor.default
        assert conv.args[1].target is quantized.dequantize_per_channel.default
    assert not any("batch_norm" in str(n.target) for n in graph.nodes)
    batch, sizes = model.preprocess(_images(4, seed=2))  # not the calibration images
    with torch.no_grad():
        reference, anchors = model.forward_head(batch)
        quantized, int8_anchors = int8.forward_head(batch)
    assert torch.equal(anchors, int8_anchors)  # anchors and everything after the head stay fp32
    for key in ("cls_logits", "bbox_regression"):
        assert quantized[key].dtype == torch.float32 and quantized[key].shape == reference[key].shape
        correlation = torch.corrcoef(torch.stack([quantized[key].flatten(), reference[key].flatten()]))[0, 1]
        assert correlation > 0.9, (key, float(correlation))


def test_int8_checkpoint_round_trip_gives_the_same_detections(calibrated, tmp_path):
    model, int8 = calibrated
    path = tmp_path / "tiny_int8.pt"
    write_checkpoint(str(path), checkpoint_payload(model))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["precision"] == "int8" and raw["int8"]["backend"] == "x86"
    state = raw["int8"]["state"]  # the observers' ranges and histograms, no second copy of the weights
    assert state and all(key.startswith(OBSERVER) for key in state) and any(key.endswith(".histogram") for key in state)
    assert read_model_metadata(str(path)).precision == "int8"

    loaded = load_model(str(path))  # the checkpoint's precision by default
    assert loaded.precision == "int8" and loaded.size == SIZE
    images = _images(3, seed=3)
    with torch.inference_mode():
        expected = int8(images)
        got = optimize_for_inference(loaded)(images)
        fp32 = optimize_for_inference(load_model(str(path), precision="fp32"))(images)
    for before, after in zip(expected, got):
        assert len(before["scores"]) > 0
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(before[key], after[key]), key
    # --precision fp32 on the int8 checkpoint runs the fp32 weights it keeps.
    with torch.inference_mode():
        reference = model(images)
    for a, b in zip(reference, fp32):
        assert torch.equal(a["scores"], b["scores"])
    # "auto" picks int8 for a calibrated model on CPU; build_model(arch, weights=...) reads it as well.
    assert load_model(str(path), precision="auto").effective_precision("cpu") == "int8"
    assert build_model(ARCH, weights=str(path)).precision == "int8"


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_exports_with_every_convolution_observed(arch):
    """Each architecture's network exports and gets the quantizer's observers on every convolution's input
    and weight (torchvision's Bottleneck calls one ReLU module three times: a graph exported without
    dynamo's per-call names made the quantizer's pattern matching fail)."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3).eval()
    prepared = _prepare(model)
    observers = {n for n in prepared.graph.nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER)}
    convs = [n for n in prepared.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert all(conv.args[0] in observers and conv.args[1] in observers for conv in convs)


def test_vgg_keeps_the_l2_normalisation_its_scale_and_the_ceil_mode_pool_in_fp32():
    torch.manual_seed(0)
    model = build_model("ssd300_vgg16", num_classes=3).eval()
    prepared = _prepare(model)
    nodes = list(prepared.graph.nodes)
    observers = [n for n in nodes if n.op == "call_module" and str(n.target).startswith(OBSERVER)]
    observed = {node.args[0] for node in observers}
    aten = torch.ops.aten
    (mul,) = [n for n in nodes if n.target is aten.mul.Tensor]
    scale, normalized = mul.args
    assert scale.target is aten.view.default and scale.args[0].target == "backbone.scale_weight"
    (norm,) = [n for n in nodes if n.target is aten.linalg_vector_norm.default]
    # Only observed values get quantized: not the learned scale, the norm, the normalised map; their
    # product is the head convolution's input (one scale for the product).
    assert not {scale, scale.args[0], norm, normalized} & observed
    assert mul in observed
    # pool3 (ceil mode: 75 -> 38) pools fp32 values; the other pools take int8 input.
    pools = [n for n in nodes if n.target is aten.max_pool2d.default]
    ceil = [n for n in pools if len(n.args) > 5 and n.args[5]]
    assert len(ceil) == 1 and ceil[0].args[0] not in observers
    assert all(n.args[0] in observers for n in pools if n not in ceil)
    # Every head predictor's output stays fp32 through the view/cat (own range per map, none forced common).
    views = [n for n in nodes if n.target is aten.view.default and n is not scale]
    assert len(views) == 12 and all(v.args[0].target is aten.conv2d.default for v in views)
    assert not {n for n in nodes if n.target is aten.cat.default} & observed


def test_precision_int8_needs_a_calibrated_model_and_training_refuses_it():
    from ssd_core.train_config import TrainConfig

    model = _tiny_model()
    with pytest.raises(ValueError, match="ssd quantize"):
        optimize_for_inference(model, "int8")
    with pytest.raises(ValueError, match="optimize_for_inference"):  # the plain model does not run int8 itself
        model.set_precision("int8").forward_head(torch.zeros(1, 3, *SIZE))
    with pytest.raises(ValueError, match="inference only.*ssd quantize"):
        TrainConfig.from_dict({"data": "d", "output": "o", "precision": "int8"}).validate()
    with pytest.raises(ValueError, match="CPU"):
        model.set_precision("int8").effective_precision("cuda")


def test_ssd_quantize_cli_calibrates_on_training_images_and_eval_loads_the_result(tmp_path, capsys):
    from ssd_core.data import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, 6, 3, seed=0, progress=False)
    names = json.loads((data / "annotations" / "instances_train.json").read_text())["categories"]
    model = _tiny_model(num_classes=len(names) + 1,
                        class_names=["__background__"] + [c["name"] for c in names])
    weights, output = tmp_path / "fp32.pt", tmp_path / "int8.pt"
    write_checkpoint(str(weights), checkpoint_payload(model))

    assert cli_main(["quantize", "--weights", str(weights), "--data", str(data), "--calibration-images", "4",
                     "--batch-size", "2", "--workers", "0", "--output", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["calibration_images"] == 4 and summary["precision"] == "int8"
    payload = torch.load(output, map_location="cpu", weights_only=True)
    assert payload["precision"] == "int8" and payload["int8"]["calibration"]["images"] == 4
    assert payload["model_config"]["size"] == SIZE  # the checkpoint's own build options are kept

    # The check before writing: fp32 and int8 AP on the val split, as `ssd eval` measures them.
    check = summary["check"]
    assert check["images"] == 3 and payload["int8"]["check"] == check
    for precision in ("fp32", "int8"):
        report = tmp_path / f"report-{precision}"
        assert cli_main(["eval", "--weights", str(output), "--data", str(data), "--workers", "0", "--samples", "0",
                         "--precision", precision, "--output", str(report)]) == 0
        assert "3 images" in capsys.readouterr().out
        metrics = json.loads((report / "metrics.json").read_text())
        for key in ("AP", "AP50"):
            assert check[precision][key] == pytest.approx(round(100 * max(metrics[key] or 0.0, 0.0), 2), abs=0.05)
    assert check["loss"]["AP"] == pytest.approx(check["fp32"]["AP"] - check["int8"]["AP"], abs=0.01)
    assert cli_main(["quantize", "--weights", str(weights), "--data", str(data), "--calibration-images", "2",
                     "--check-images", "0", "--workers", "0", "--output", str(output)]) == 0
    assert "check" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # A loss beyond --max-ap-loss writes nothing (any loss exceeds -100: the refusal path, deterministically).
    refused = tmp_path / "refused.pt"
    assert cli_main(["quantize", "--weights", str(weights), "--data", str(data), "--calibration-images", "2",
                     "--max-ap-loss", "-100", "--workers", "0", "--output", str(refused)]) == 1
    assert "AP50 points against fp32 on 3 val images" in capsys.readouterr().err and not refused.exists()
    assert cli_main(["quantize", "--weights", str(weights), "--data", str(data), "--calibration-images", "0",
                     "--output", str(output)]) == 1
    assert "--calibration-images must be >= 1" in capsys.readouterr().err


def test_detect_refuses_int8_for_weights_without_calibration_before_starting_ray(tmp_path):
    from ssd_core.bulk import detect_bucket

    weights = tmp_path / "fp32.pt"
    write_checkpoint(str(weights), checkpoint_payload(_tiny_model()))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"needs an int8 checkpoint; .*fp32\.pt is fp32: calibrate it with `ssd quantize"):
        detect_bucket(str(tmp_path / "images"), str(tmp_path / "out"), weights=str(weights), precision="int8",
                      progress=False)
