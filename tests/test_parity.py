"""Parity with torchvision: its state_dict loads into ssd_core and both give the same detections
and losses (fp32) on the same images, including non-square sizes, a box touching the border and an
image without boxes."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ssd_core import build_model

TV_BUILDERS = {
    "ssd300_vgg16": torchvision.models.detection.ssd300_vgg16,
    "ssdlite320_mobilenet_v3_large": torchvision.models.detection.ssdlite320_mobilenet_v3_large,
}


def _images_and_targets(num_classes: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    sizes = [(300, 300), (240, 410), (375, 200)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 120.0, 200.0], [150.0, 30.0, 300.0, 290.0]]),
         "labels": torch.tensor([1, num_classes - 1])},
        {"boxes": torch.tensor([[0.0, 0.0, 60.0, 50.0], [200.0, 100.0, 410.0, 240.0], [5.0, 5.0, 12.0, 14.0]]),
         "labels": torch.tensor([3, 7, 2])},  # touches the border; one tiny box
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # no boxes
    ]
    return images, targets


@pytest.fixture(scope="module", params=list(TV_BUILDERS))
def pair(request, tmp_path_factory):
    arch = request.param
    torch.manual_seed(0)
    reference = TV_BUILDERS[arch](weights=None, weights_backbone=None, num_classes=91)
    # SSDLite's N(0, 0.03) init makes every score exactly 1/91, and ties make the order arbitrary:
    # give its convolutions He init so scores spread out (the check is on equivalence, not accuracy).
    if arch.startswith("ssdlite"):
        with torch.no_grad():
            for module in reference.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
    path = tmp_path_factory.mktemp("w") / f"{arch}.pt"
    torch.save(reference.state_dict(), path)
    ours = build_model(arch, weights=str(path))
    return arch, reference, ours


def test_detections_match_torchvision(pair):
    arch, reference, ours = pair
    images, _ = _images_and_targets(91)
    reference.eval()
    ours.eval()
    with torch.no_grad():
        expected = reference(images)
        got = ours(images)
    for i, (e, o) in enumerate(zip(expected, got)):
        assert e["boxes"].shape[0] > 0, "random weights should still give detections"
        assert e["scores"].unique().numel() == e["scores"].numel(), "ties would make the order arbitrary"
        assert e["boxes"].shape == o["boxes"].shape, f"{arch} image {i}"
        torch.testing.assert_close(o["scores"], e["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-4, rtol=1e-5)
        assert torch.equal(o["labels"], e["labels"]), f"{arch} image {i}: labels differ"


def test_preprocessing_matches_torchvision_bit_for_bit(pair):
    arch, reference, ours = pair
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 480, 640, generator=g), torch.rand(3, 211, 97, generator=g),
              torch.rand(480, 640, 3, generator=g).permute(2, 0, 1),  # a view of HWC pixels
              torch.rand(3, *ours.size, generator=g)]  # already at the input size
    with torch.no_grad():
        expected = reference.transform(images)[0].tensors
        batch, original = ours.preprocess(images)
    assert torch.equal(batch, expected)
    assert original.tolist() == [list(image.shape[-2:]) for image in images]


def test_losses_match_torchvision(pair):
    arch, reference, ours = pair
    images, targets = _images_and_targets(91)
    reference.train()
    ours.train()
    # BatchNorm in train mode would update running stats differently per call: compare one call each
    torch.manual_seed(1)
    expected = reference(images, targets)
    got = ours(images, targets)
    for key in ("bbox_regression", "classification"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-5)
    assert expected["bbox_regression"] > 0


def _training_batches(size: int, num_classes: int, *, steps: int, batch_size: int):
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(steps):
        images = [torch.rand(3, size, size, generator=g) for _ in range(batch_size)]
        targets = []
        for _ in range(batch_size):
            n = int(torch.randint(1, 4, (1,), generator=g))
            xy = torch.rand(n, 2, generator=g) * size * 0.6
            wh = 6 + torch.rand(n, 2, generator=g) * size * 0.35
            targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1),
                            "labels": torch.randint(1, num_classes, (n,), generator=g)})
        batches.append((images, targets))
    return batches


def test_sgd_steps_match_torchvision():
    """K SGD steps of ssd_core's training step (engine.training_step, parameter groups, warm-up schedule)
    and of a plain torchvision loop, from the same weights on the same batches in fp32: the losses of
    every step and the final weights and BatchNorm statistics agree."""
    from ssd_core.engine import lr_factor, parameter_groups, training_step
    from ssd_core.train_config import TrainConfig

    size, num_classes, steps, batch_size, lr, weight_decay = 96, 4, 4, 2, 0.02, 4e-5
    torch.manual_seed(0)
    reference = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes)
    # torchvision fixes 320 px in the builder; its transform resizes to whatever fixed_size says.
    reference.transform.fixed_size, reference.transform.min_size, reference.transform.max_size = (size, size), (size,), size
    with torch.no_grad():  # He init: no tied scores, so hard negative mining picks the same boxes on both sides
        for module in reference.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    ours = build_model("ssdlite320_mobilenet_v3_large", num_classes=num_classes, size=(size, size))
    ours.load_state_dict(start)

    # torchvision's side, written independently: decay on conv/linear weights only, LinearLR warm-up.
    no_decay = {id(p) for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    no_decay |= {id(p) for name, p in reference.named_parameters() if name.endswith(".bias")}
    params = list(reference.parameters())
    tv_optimizer = torch.optim.SGD([
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}], lr=lr, momentum=0.9)
    tv_scheduler = torch.optim.lr_scheduler.LinearLR(tv_optimizer, start_factor=0.1, total_iters=steps)

    config = TrainConfig(data="unused", precision="fp32", grad_clip=None, lr=lr, weight_decay=weight_decay)
    optimizer = torch.optim.SGD(parameter_groups(ours, weight_decay), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        total_steps=steps, warmup_iters=steps, warmup_factor=0.1, schedule="multistep", milestones=[], gamma=0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    reference.train()
    ours.train()
    for images, targets in _training_batches(size, num_classes, steps=steps, batch_size=batch_size):
        expected = reference(images, targets)
        loss = expected["bbox_regression"] + expected["classification"]
        tv_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tv_optimizer.step()
        tv_scheduler.step()
        got = training_step(ours, optimizer, scheduler, scaler, images, targets, torch.device("cpu"), config)
        for key in ("bbox_regression", "classification"):
            assert got[key] == pytest.approx(expected[key].item(), rel=1e-5)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(tv_optimizer.param_groups[0]["lr"])

    final, moved = ours.state_dict(), 0.0
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        if value.is_floating_point():
            moved = max(moved, (value - start[key]).abs().max().item())
    assert moved > 0.1, "the steps must actually change the weights"
