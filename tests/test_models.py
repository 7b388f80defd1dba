"""Every registered architecture gets the same smoke test; plus input validation, weight import
(NVIDIA's SSD300 layout rebuilt here from its description) and precision."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ssd_core import build_model, list_models, load_model
from ssd_core.zoo import checkpoint_payload


@pytest.mark.parametrize("arch", list_models())
def test_smoke_every_architecture(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5)
    images = [torch.rand(3, 200, 260), torch.rand(3, 320, 240)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 100.0, 150.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[0.0, 0.0, 240.0, 320.0], [50.0, 60.0, 70.0, 90.0]]), "labels": torch.tensor([1, 4])},
    ]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, image in zip(detections, images):
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] == det["labels"].shape[0]
        assert det["labels"].dtype == torch.int64
        assert torch.isfinite(det["boxes"]).all()
        assert ((det["labels"] >= 1) & (det["labels"] < 5)).all()
        h, w = image.shape[-2:]
        assert (det["boxes"][:, 0::2] <= w + 1e-3).all() and (det["boxes"][:, 1::2] <= h + 1e-3).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


@pytest.mark.parametrize("arch", list_models())
def test_registry_entry_is_complete(arch):
    """What is keyed by architecture lives on its SSDConfig: a training recipe TrainConfig resolves, the
    "DEFAULT" weights are registered (and for its own backbone), and torchvision's builder is the
    architecture of the same name."""
    from ssd_core.train_config import TrainConfig
    from ssd_core.weights import get_weights
    from ssd_core.zoo import CONFIGS

    config = CONFIGS[arch]
    resolved = TrainConfig(arch=arch, data="d", batch_size=8).resolved(world_size=2)
    assert resolved.lr == pytest.approx(config.recipe.lr_per_32 * 16 / 32)
    assert (resolved.schedule, resolved.augment) == (config.recipe.schedule, config.recipe.augment)
    assert get_weights("DEFAULT", arch, backbone=True).full_name == config.default_backbone_weights
    assert get_weights(config.default_backbone_weights).arch == config.backbone
    if config.default_weights is None:
        with pytest.raises(ValueError, match="no published COCO weights"):
            get_weights("DEFAULT", arch)
    else:
        assert get_weights("DEFAULT", arch).full_name == config.default_weights
    if config.torchvision_builder is not None:
        assert config.torchvision_builder in torchvision.models.list_models(torchvision.models.detection)
    with pytest.raises(ValueError, match="unknown model options"):
        build_model(arch, recipe=None)


@pytest.mark.parametrize(
    "images, targets, message",
    [
        ([torch.rand(1, 50, 50)], None, "image 0: expected shape"),
        ([torch.rand(3, 50, 50), (torch.rand(3, 50, 50) * 255).to(torch.uint8)], None, "image 1: expected a float"),
        ([torch.rand(3, 50, 50), torch.full((3, 40, 40), float("nan"))], None, "image 1: contains NaN"),
        ([torch.rand(3, 50, 50)], [{"boxes": torch.tensor([[10.0, 10.0, 5.0, 20.0]]), "labels": torch.tensor([1])}],
         "image 0: box 0 .* x2 <= x1"),
        ([torch.rand(3, 50, 50)] * 2,
         [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
          {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([5])}],
         "image 1: label 5 .* outside 1..4"),
        ([torch.rand(3, 50, 50)], [{"boxes": torch.tensor([[1.0, float("inf"), 5.0, 5.0]]), "labels": torch.tensor([1])}],
         "image 0: boxes contain NaN or Inf"),
    ],
)
def test_bad_input_is_a_clear_error(images, targets, message):
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=5)
    model.train(targets is not None)
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_empty_batch_of_targets_trains():
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([torch.rand(3, 64, 64)] * 2, [empty, empty])  # batch 2: BatchNorm needs > 1 value
    assert losses["classification"].item() == 0.0 and losses["bbox_regression"].item() == 0.0


def test_trainable_backbone_layers():
    model = build_model("ssd300_vgg16", trainable_backbone_layers=0)
    assert not any(p.requires_grad for p in model.backbone.features.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model = build_model("ssd300_vgg16", trainable_backbone_layers=5)
    assert all(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        build_model("ssd300_vgg16", trainable_backbone_layers=9)


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=4, class_names=["__background__", "a", "b", "c"])
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_payload(model), path)
    loaded = load_model(str(path)).eval()
    assert loaded.class_names == ["__background__", "a", "b", "c"] and loaded.arch == model.arch
    image = [torch.rand(3, 120, 90)]
    with torch.no_grad():
        a, b = model.eval()(image)[0], loaded(image)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
    with pytest.raises(ValueError, match="is a ssdlite320_mobilenet_v3_large model, not ssd300_vgg16"):
        build_model("ssd300_vgg16", weights=str(path))
    # Another class count fine-tunes: every weight but the classification head is kept.
    names = ["__background__", *"abcdef"]
    tuned = build_model("ssdlite320_mobilenet_v3_large", weights=str(path), num_classes=7, class_names=names)
    assert tuned.num_classes == 7 and tuned.class_names == names
    before, after = model.state_dict(), tuned.state_dict()
    kept = [k for k in after if not k.startswith("head.classification_head.")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert after["head.classification_head.module_list.0.1.weight"].shape[0] == 6 * 7  # 6 anchors x 7 classes
    # The same count of other classes re-initialises the head too; the same names keep it.
    head = "head.classification_head.module_list.0.1.weight"
    renamed = build_model("ssdlite320_mobilenet_v3_large", weights=str(path), num_classes=4,
                          class_names=["__background__", "x", "y", "z"])
    assert not torch.equal(renamed.state_dict()[head], before[head])
    same = build_model("ssdlite320_mobilenet_v3_large", weights=str(path), num_classes=4,
                       class_names=["__background__", "a", "b", "c"])
    assert torch.equal(same.state_dict()[head], before[head])
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_model("ssd300_vgg16", weights=str(tmp_path / "missing.pt"))


def test_foreign_state_dict_mismatch_lists_keys(tmp_path):
    state = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None).state_dict()
    state.pop("backbone.scale_weight")
    state["head.extra_thing"] = torch.zeros(1)
    path = tmp_path / "tv.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: backbone.scale_weight.*unexpected keys: head.extra_thing"):
        build_model("ssd300_vgg16", weights=str(path))


# -- NVIDIA SSD300 v1.1, rebuilt from DeepLearningExamples' published layout -----------------------

class NvidiaSSD300(nn.Module):
    def __init__(self, label_num=81):
        super().__init__()
        resnet = torchvision.models.resnet50()
        extractor = nn.Sequential(*list(resnet.children())[:7])
        block = extractor[-1][0]
        block.conv1.stride, block.conv2.stride, block.downsample[0].stride = (1, 1), (1, 1), (1, 1)
        self.feature_extractor = nn.Module()
        self.feature_extractor.feature_extractor = extractor
        channels = [1024, 512, 512, 256, 256, 256]
        blocks = []
        for i, (cin, cout, mid) in enumerate(zip(channels[:-1], channels[1:], [256, 256, 128, 128, 128])):
            stride, pad = (2, 1) if i < 3 else (1, 0)
            blocks.append(nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, 3, padding=pad, stride=stride, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            ))
        self.additional_blocks = nn.ModuleList(blocks)
        self.num_defaults = [4, 6, 6, 6, 4, 4]
        self.label_num = label_num
        self.loc = nn.ModuleList(nn.Conv2d(c, n * 4, 3, padding=1) for c, n in zip(channels, self.num_defaults))
        self.conf = nn.ModuleList(nn.Conv2d(c, n * label_num, 3, padding=1) for c, n in zip(channels, self.num_defaults))
        for module in self.modules():  # non-trivial BatchNorm statistics so the check means something
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.running_mean, -0.1, 0.1)
                nn.init.uniform_(module.running_var, 0.5, 1.5)
                nn.init.uniform_(module.weight, 0.5, 1.5)

    def forward(self, x):
        x = self.feature_extractor.feature_extractor(x)
        sources = [x]
        for block in self.additional_blocks:
            x = block(x)
            sources.append(x)
        locs = [loc(s).view(s.size(0), 4, -1) for s, loc in zip(sources, self.loc)]
        confs = [c(s).view(s.size(0), self.label_num, -1) for s, c in zip(sources, self.conf)]
        return torch.cat(locs, 2), torch.cat(confs, 2), [s.shape[-2:] for s in sources]


def _nvidia_to_our_order(grid_sizes, num_defaults):
    """Index into NVIDIA's box order (per map: box type, row, column) for each of our boxes
    (per map: row, column, box type)."""
    order, offset = [], 0
    for (h, w), a in zip(grid_sizes, num_defaults):
        idx = torch.arange(a * h * w).view(a, h, w).permute(1, 2, 0).reshape(-1)
        order.append(idx + offset)
        offset += a * h * w
    return torch.cat(order)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_nvidia_checkpoint_import(tmp_path, prefix):
    torch.manual_seed(0)
    reference = NvidiaSSD300().eval()
    path = tmp_path / "nvidia.pt"
    torch.save({"epoch": 64, "model": {prefix + k: v for k, v in reference.state_dict().items()}}, path)
    model = build_model("ssd300_resnet50", weights=str(path)).eval()
    assert model.num_classes == 81 and model.class_names[1] == "person"
    batch, _ = model.preprocess([torch.rand(3, 300, 300)])
    with torch.no_grad():
        ref_loc, ref_conf, grid = reference(batch)
        head, anchors = model.forward_head(batch)
    assert head["bbox_regression"].shape == (1, 8732, 4) and head["cls_logits"].shape == (1, 8732, 81)
    assert ref_loc.shape == (1, 4, 8732) and ref_conf.shape == (1, 81, 8732)
    order = _nvidia_to_our_order(grid, reference.num_defaults)
    torch.testing.assert_close(head["bbox_regression"][0], ref_loc[0].t()[order], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head["cls_logits"][0], ref_conf[0].t()[order], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="use arch ssd300_resnet50"):
        build_model("ssd300_vgg16", weights=str(path))


def test_bf16_runs_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=5).eval()
    batch, original = model.preprocess([torch.rand(3, 320, 320)])
    with torch.no_grad():
        fp32, _ = model.forward_head(batch)
        model.set_precision("bf16")
        bf16, _ = model.forward_head(batch)
        detections = model(list(batch.clamp(0, 1)))
    assert bf16["cls_logits"].dtype == torch.float32  # post-processing always sees fp32
    assert (bf16["cls_logits"] - fp32["cls_logits"]).abs().max() < 0.1
    assert torch.isfinite(detections[0]["boxes"]).all()
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        model.set_precision("fp16")
        model(list(batch.clamp(0, 1)))




def test_slow_bf16_depthwise_convolutions_train_in_fp32():
    """SSDLite's strided and 5x5 depthwise convolutions run in fp32 when they train under bf16 autocast
    (their gradients then match a plain fp32 convolution's) and stay bf16 for inference; 3x3 stride-1
    depthwise and pointwise convolutions stay bf16 throughout."""
    import torch.nn.functional as F

    from ssd_core.backbones.mobilenet import Fp32GradDepthwiseConv2d

    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=3, size=(96, 96))
    chosen = [m for m in model.modules() if isinstance(m, Fp32GradDepthwiseConv2d)]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert chosen and all(max(m.stride) > 1 or max(m.kernel_size) > 3 for m in chosen)
    assert all(max(m.stride) == 1 and max(m.kernel_size) == 3 for m in depthwise if m not in chosen)
    conv = next(m for m in chosen if m.kernel_size == (5, 5) and m.stride == (2, 2))
    x = torch.randn(2, conv.in_channels, 12, 12, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.float32
    (grad_w,) = torch.autograd.grad(y.square().sum(), conv.weight)
    weight = conv.weight.detach().requires_grad_()
    reference = F.conv2d(x.detach().float(), weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    (expected,) = torch.autograd.grad(reference.square().sum(), weight)
    torch.testing.assert_close(grad_w, expected, rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x.detach()).dtype == torch.bfloat16
