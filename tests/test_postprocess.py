"""Batched post-processing equals torchvision's image-by-image, class-by-class reference."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ssd_core.anchors import DefaultBoxes
from ssd_core.postprocess import PostProcessConfig, postprocess

WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SIZE = (300, 300)


@pytest.fixture(scope="module")
def reference():
    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()


def _anchors():
    boxes = DefaultBoxes([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                         scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
    return boxes.xyxy([(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)], SIZE)


def _compare(reference, logits, regression, config, original_sizes):
    anchors = _anchors()
    reference.score_thresh, reference.nms_thresh = config.score_thresh, config.nms_thresh
    reference.detections_per_img, reference.topk_candidates = config.detections_per_img, config.topk_candidates
    batch = logits.shape[0]
    expected = reference.postprocess_detections(
        {"cls_logits": logits, "bbox_regression": regression}, [anchors] * batch, [SIZE] * batch
    )
    expected = reference.transform.postprocess(expected, [SIZE] * batch, original_sizes)
    got = postprocess(logits, regression, anchors, SIZE, torch.tensor(original_sizes), config, WEIGHTS)
    for e, o in zip(expected, got):
        assert e["scores"].unique().numel() == e["scores"].numel(), "ties would make the order arbitrary"
        assert o["boxes"].shape == e["boxes"].shape
        torch.testing.assert_close(o["scores"], e["scores"])
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-4, rtol=1e-5)
        assert torch.equal(o["labels"], e["labels"])
    return got


def test_random_outputs_many_candidates(reference):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8732, 21, generator=g) * 3
    regression = torch.randn(3, 8732, 4, generator=g) * 0.5
    got = _compare(reference, logits, regression, PostProcessConfig(), [(300, 300), (480, 640), (200, 133)])
    assert all(len(d["boxes"]) == 200 for d in got)


def test_heavy_suppression_grows_the_pool_and_stays_exact(reference):
    # Every default box predicts nearly the same box for one class, so NMS keeps few of the first
    # pool and the exact answer needs the pool to grow.
    g = torch.Generator().manual_seed(1)
    anchors = _anchors()
    from ssd_core.boxes import encode

    target = torch.tensor([100.0, 100.0, 200.0, 220.0]) + torch.randn(8732, 4, generator=g)
    regression = encode(target, anchors, WEIGHTS).unsqueeze(0)
    logits = torch.randn(1, 8732, 6, generator=g)
    logits[..., 2] += 4
    got = _compare(reference, logits, regression, PostProcessConfig(pool_size=50, detections_per_img=100),
                   [(300, 300)])
    assert 0 < len(got[0]["boxes"]) < 100


def test_nothing_above_threshold(reference):
    logits = torch.zeros(2, 8732, 5)
    logits[..., 0] = 20  # background wins everywhere
    got = _compare(reference, logits, torch.zeros(2, 8732, 4), PostProcessConfig(), [(300, 300), (100, 100)])
    assert all(d["boxes"].shape == (0, 4) for d in got)


def _deployment_logits(batch: int, num_anchors: int, num_classes: int, seed: int) -> torch.Tensor:
    """Logits where few boxes pass a 0.3 threshold: background mostly wins, some boxes are confident."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_anchors, num_classes, generator=g)
    logits[..., 0] += 3
    confident = torch.rand(batch, num_anchors, generator=g) < 0.02
    boost = torch.zeros(batch, num_anchors, num_classes)
    boost[..., 1:] = torch.rand(batch, num_anchors, num_classes - 1, generator=g) * 8
    return logits + boost * confident[..., None]


def test_deployment_threshold_takes_the_sparse_path_and_equals_torchvision(reference):
    from ssd_core.postprocess import SparseCandidates

    logits = _deployment_logits(4, 8732, 21, seed=2)
    config = PostProcessConfig(score_thresh=0.3)
    scores = torch.softmax(logits, dim=-1)
    assert SparseCandidates.gather(scores, config) is not None, "this input should use the sparse path"
    got = _compare(reference, logits, torch.randn(4, 8732, 4) * 0.5, config,
                   [(300, 300), (480, 640), (200, 133), (1000, 90)])
    assert sum(len(d["boxes"]) for d in got) > 50


def test_a_class_over_topk_falls_back_to_the_dense_path_and_stays_exact(reference):
    from ssd_core.postprocess import SparseCandidates

    logits = _deployment_logits(2, 8732, 6, seed=3)
    logits[1, :1500, 4] += 4  # ~1,000 of one class above 0.3: more than topk_candidates (400)
    config = PostProcessConfig(score_thresh=0.3)
    assert SparseCandidates.gather(torch.softmax(logits, dim=-1), config) is None
    _compare(reference, logits, torch.randn(2, 8732, 4) * 0.5, config, [(300, 300), (480, 640)])


def test_sparse_and_dense_candidates_give_the_same_pool():
    from ssd_core.postprocess import DenseCandidates, SparseCandidates, class_topk

    config = PostProcessConfig(score_thresh=0.3)
    scores = torch.softmax(_deployment_logits(3, 3234, 91, seed=4), dim=-1)
    sparse = SparseCandidates.gather(scores, config)
    dense = DenseCandidates(*class_topk(scores, config), config.score_thresh)
    assert torch.equal(sparse.num_valid, dense.num_valid)
    width = int(sparse.num_valid.max())
    for pool in (7, width):
        s_scores, s_labels, s_anchors = sparse.pool(pool)
        d_scores, d_labels, d_anchors = dense.pool(pool)
        valid = d_scores > config.score_thresh
        assert torch.equal(s_scores > config.score_thresh, valid)
        assert torch.equal(s_scores[valid], d_scores[valid])
        assert torch.equal(s_labels[valid], d_labels[valid]) and torch.equal(s_anchors[valid], d_anchors[valid])


def test_pair_candidates_give_the_dense_pool_and_fall_back_when_a_class_is_capped():
    from ssd_core.postprocess import DenseCandidates, PairCandidates, class_topk

    config = PostProcessConfig(score_thresh=0.001, topk_candidates=300)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3234, 91, generator=g)
    logits[1, :, 7] += 6  # image 1: class 7 leads at every default box, more than topk_candidates of them
    scores = torch.softmax(logits, dim=-1)
    dense = DenseCandidates(*class_topk(scores, config), config.score_thresh)
    pairs = PairCandidates(scores.clone(), config)
    assert torch.equal(pairs.num_valid, dense.num_valid)
    for pool in (50, 300, 1000):
        fresh = PairCandidates(scores.clone(), config)
        got, expected = fresh.pool(pool), dense.pool(pool)
        valid = expected[0] > config.score_thresh
        assert torch.equal(got[0] > config.score_thresh, valid)
        for g_part, e_part in zip(got, expected):
            assert torch.equal(g_part[valid], e_part[valid])
        # Within step 1's cap the top pairs are the pool; beyond it the dense candidates give it.
        assert (fresh._dense is None) == (pool <= config.topk_candidates)
