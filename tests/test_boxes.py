import torch
from torchvision.models.detection._utils import BoxCoder

from ssd_core.boxes import clip_to_size, decode, encode

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 200
    wh = 10 + torch.rand(n, 2, generator=generator) * 90  # size ratios within the decode clip
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors, gt = _random_boxes(500, g), _random_boxes(500, g)
    codes = encode(gt, anchors, WEIGHTS)
    torch.testing.assert_close(decode(codes, anchors, WEIGHTS), gt, atol=1e-3, rtol=1e-5)


def test_coder_matches_torchvision_and_broadcasts():
    g = torch.Generator().manual_seed(1)
    anchors, gt = _random_boxes(64, g), _random_boxes(64, g)
    reference = BoxCoder(weights=WEIGHTS)
    torch.testing.assert_close(encode(gt, anchors, WEIGHTS), reference.encode_single(gt, anchors))
    codes = torch.randn(3, 64, 4, generator=g)
    batched = decode(codes, anchors, WEIGHTS)  # [3, 64, 4] against shared anchors
    for b in range(3):
        torch.testing.assert_close(batched[b], reference.decode_single(codes[b], anchors))


def test_decode_clamps_huge_scale():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchors, WEIGHTS)
    assert torch.isfinite(boxes).all()


def test_clip_to_size():
    boxes = torch.tensor([[-5.0, -1.0, 50.0, 400.0]])
    assert clip_to_size(boxes, (300, 40)).tolist() == [[0.0, 0.0, 40.0, 300.0]]
