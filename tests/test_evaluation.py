"""ssd_core.evaluation against pycocotools run directly on the same files, and end to end through a model."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from s3_server import moto_s3, s3_bucket  # noqa: F401

from ssd_core import evaluation
from ssd_core.cli import main as ssd_main

# Non-contiguous ids; "unused" has no ground truth (its AP must be null, not 0 or -1).
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"},
              {"id": 20, "name": "unused"}]
IMAGE_W, IMAGE_H = 320, 240


def _gt_document(rng: np.random.Generator) -> dict:
    """Six images with small (<32^2), medium and large boxes of three classes, and one crowd region."""
    images, annotations = [], []
    sizes = [(10, 14), (20, 25), (40, 50), (60, 70), (110, 120), (150, 180)]  # small, medium, large pairs
    for image_id in range(1, 7):
        images.append({"id": image_id * 10, "file_name": f"{image_id:03d}.png", "width": IMAGE_W, "height": IMAGE_H})
        for k in range(4):
            w, h = sizes[(image_id + k) % len(sizes)]
            x, y = rng.uniform(0, IMAGE_W - w), rng.uniform(0, IMAGE_H - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id * 10,
                                "category_id": [3, 7, 12][(image_id * 3 + k) % 3],
                                "bbox": [x, y, float(w), float(h)], "area": float(w * h), "iscrowd": 0})
    annotations.append({"id": len(annotations) + 1, "image_id": 10, "category_id": 3, "iscrowd": 1,
                        "bbox": [200.0, 150.0, 100.0, 80.0], "area": 8000.0, "segmentation": []})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _results(gt: dict, rng: np.random.Generator) -> list[dict]:
    """Perturbed ground truth (some missed), false positives, and a hit on the crowd region."""
    results = []
    for ann in gt["annotations"]:
        if ann["iscrowd"] or rng.random() < 0.2:
            continue  # crowd regions are never predicted directly; 20% of objects missed
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                        "score": float(rng.uniform(0.3, 1.0))})
    for image in gt["images"]:
        for _ in range(3):  # false positives, some with wrong classes
            results.append({"image_id": image["id"], "category_id": int(rng.choice([3, 7, 12])),
                            "bbox": [float(rng.uniform(0, 250)), float(rng.uniform(0, 180)), 30.0, 25.0],
                            "score": float(rng.uniform(0.0, 0.8))})
    results.append({"image_id": 10, "category_id": 3, "bbox": [210.0, 160.0, 40.0, 30.0], "score": 0.9})
    return results


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(dataset root, GT json in the project's layout, results json); the images are plain PNGs."""
    root = tmp_path_factory.mktemp("cocoeval")
    rng = np.random.default_rng(7)
    gt = _gt_document(rng)
    (root / "annotations").mkdir()
    gt_path = root / "annotations" / "instances_val.json"
    gt_path.write_text(json.dumps(gt))
    (root / "val").mkdir()
    for i, image in enumerate(gt["images"]):
        shade = (30 + 40 * i) % 256
        Image.new("RGB", (IMAGE_W, IMAGE_H), (shade, 255 - shade, 128)).save(root / "val" / image["file_name"])
    dt_path = root / "results.json"
    dt_path.write_text(json.dumps(_results(gt, rng)))
    return root, gt_path, dt_path


def _pycocotools(gt_path: Path, dt_path: Path, cat_ids: list[int] | None = None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(dt_path)), iouType="bbox")
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_metrics_equal_pycocotools(coco_files):
    _, gt_path, dt_path = coco_files
    ours = evaluation.coco_metrics(str(gt_path), str(dt_path))
    reference = _pycocotools(gt_path, dt_path)
    assert all(s >= 0 for s in reference), "fixture should exercise every area range"
    assert 0.2 < reference[0] < 0.9, "fixture should be neither trivial nor hopeless"
    assert [ours[name] for name in evaluation.METRIC_NAMES] == [float(s) for s in reference]

    for category in CATEGORIES:
        expected = _pycocotools(gt_path, dt_path, cat_ids=[category["id"]])[0]
        assert ours["per_class_AP"][category["name"]] == (None if expected == -1 else float(expected))
    assert ours["per_class_AP"]["unused"] is None
    assert ours["num_images"] == 6


def test_in_memory_inputs_match_files_and_are_not_mutated(coco_files):
    _, gt_path, dt_path = coco_files
    results = json.loads(dt_path.read_text())
    snapshot = json.dumps(results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
    from_memory = evaluation.coco_metrics(coco_gt, results)
    assert json.dumps(results) == snapshot  # pycocotools' loadRes adds keys; we must pass it copies
    from_files = evaluation.coco_metrics(gt_path, dt_path)
    assert evaluation.scalar_metrics(from_memory) == evaluation.scalar_metrics(from_files)


def test_pr_curves_agree_with_ap50(coco_files):
    _, gt_path, dt_path = coco_files
    metrics = evaluation.coco_metrics(gt_path, dt_path)
    curves = metrics["pr_curves"]
    assert len(curves["recall"]) == 101
    overall_50 = curves["precision"]["0.50"]["all"]
    # AP50 is the mean interpolated precision over the 101 recall points.
    assert np.mean(overall_50) == pytest.approx(metrics["AP50"], abs=1e-12)
    assert np.mean(curves["precision"]["0.50"]["dog"]) == pytest.approx(metrics["per_class_AP50"]["dog"])
    assert curves["precision"]["0.75"]["unused"] is None


def test_empty_results_score_zero(coco_files, tmp_path):
    _, gt_path, _ = coco_files
    empty_file = tmp_path / "empty.json"
    empty_file.write_text("[]")
    for results in ([], empty_file):
        metrics = evaluation.coco_metrics(gt_path, results)
        assert [metrics[name] for name in evaluation.METRIC_NAMES] == [0.0] * 12
        assert metrics["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0, "unused": None}
        assert metrics["num_detections"] == 0


def test_unknown_image_or_category_is_a_clear_error(coco_files):
    _, gt_path, _ = coco_files
    detection = {"image_id": 10, "category_id": 3, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.5}
    with pytest.raises(ValueError, match=r"image_id not in the ground truth: \[999\]"):
        evaluation.coco_metrics(gt_path, [detection, {**detection, "image_id": 999}])
    with pytest.raises(ValueError, match=r"category_id not in the ground truth: \[4\]"):
        evaluation.coco_metrics(gt_path, [{**detection, "category_id": 4}])
    with pytest.raises(ValueError, match="missing"):
        evaluation.coco_metrics(gt_path, [{"image_id": 10, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluation.coco_metrics(gt_path, "nope.json")


def test_cli_scores_a_results_file(coco_files, tmp_path, capsys):
    _, gt_path, dt_path = coco_files
    out = tmp_path / "report"
    assert ssd_main(["eval", "--annotations", str(gt_path), "--results", str(dt_path), "--output", str(out),
                     "--show-gt", "--confusion-score", "0.5"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert set(evaluation.METRIC_NAMES) <= set(saved)
    assert saved["AP"] == pytest.approx(float(_pycocotools(gt_path, dt_path)[0]))
    assert set(saved["per_class_AP"]) == {"cat", "dog", "bird", "unused"}
    assert f"{saved['AP']:6.3f}" in printed and str(out / "report.md") in printed
    assert json.loads((out / "results.json").read_text()) == json.loads(dt_path.read_text())
    report = (out / "report.md").read_text()
    assert "| AP50 |" in report and "| bird |" in report
    assert "(pr_curves.png)" in report and "(samples.png)" in report and "(confusion.png)" in report
    confusion = saved["confusion"]
    assert (confusion["score_threshold"], confusion["iou_threshold"]) == (0.5, 0.5)
    assert confusion == evaluation.confusion_matrix(gt_path, dt_path, score_threshold=0.5)
    for picture in ("pr_curves.png", "samples.png", "confusion.png"):
        with Image.open(out / picture) as image:
            assert image.width > 300 and image.height > 200


def test_cli_argument_errors_are_one_line(coco_files, tmp_path, capsys):
    _, gt_path, _ = coco_files
    assert ssd_main(["eval", "--annotations", str(gt_path), "--output", str(tmp_path)]) == 1
    assert "--results" in capsys.readouterr().err


def test_label_mapping_by_name_for_foreign_models():
    class Dataset:
        class_names = ["__background__", "cat", "dog"]
        label_to_category_id = [0, 17, 18]

    coco_style = ["__background__", "person", "N/A", "dog", "cat"]
    assert evaluation.model_label_to_category_id(coco_style, Dataset) == [-1, -1, -1, 18, 17]
    assert evaluation.model_label_to_category_id(Dataset.class_names, Dataset) == [-1, 17, 18]
    assert evaluation.model_label_to_category_id(["__background__", "a", "b"], Dataset) == [-1, 17, 18]
    with pytest.raises(ValueError, match="share no names"):
        evaluation.model_label_to_category_id(["__background__", "a"], Dataset)


# --------------------------------------------------------------------------- through a model


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    from ssd_core.data import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=0, num_val=8, seed=3, progress=False)


class OracleModel(torch.nn.Module):
    """Answers with the ground truth of whichever dataset image it is shown (looked up by pixels)."""

    def __init__(self, dataset, class_names):
        super().__init__()
        self.class_names = class_names
        self.answers = {self._key(image): target for image, target in (dataset[i] for i in range(len(dataset)))}

    @staticmethod
    def _key(image: torch.Tensor) -> str:
        return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()

    def forward(self, images):
        answers = [self.answers[self._key(image)] for image in images]
        return [{"boxes": a["boxes"], "labels": a["labels"], "scores": torch.ones(len(a["labels"]))}
                for a in answers]


@pytest.mark.parametrize("resize", [None, (160, 200)], ids=["file-size", "resized-by-transforms"])
def test_ground_truth_as_detections_scores_perfectly(synthetic_root, resize):
    """Contiguous labels -> category ids and (resized) boxes -> file pixels, end to end."""
    from ssd_core.data import CocoDataset, build_preset

    dataset = CocoDataset(synthetic_root, split="val",
                          transforms=build_preset("none", size=resize) if resize else None)
    assert len(dataset.coco.getAnnIds()) > 8
    metrics = evaluation.evaluate_model(OracleModel(dataset, dataset.class_names), dataset, batch_size=3,
                                        workers=0, progress=False)
    assert metrics["AP"] == 1.0 and metrics["AR100"] == 1.0
    categories_in_results = {det["category_id"] for det in metrics["results"]}
    assert categories_in_results == {ann["category_id"] for ann in dataset.coco.dataset["annotations"]}


def test_max_images_scores_only_those_images(synthetic_root):
    from ssd_core.data import CocoDataset

    dataset = CocoDataset(synthetic_root, split="val")
    metrics = evaluation.evaluate_model(OracleModel(dataset, dataset.class_names), dataset, batch_size=4,
                                        workers=0, progress=False, max_images=3)
    assert metrics["num_images"] == 3 and metrics["AP"] == 1.0  # the 5 unseen images are not misses
    assert {det["image_id"] for det in metrics["results"]} <= set(dataset.image_ids[:3])


def test_random_weight_model_end_to_end(synthetic_root, tmp_path):
    from ssd_core import build_model
    from ssd_core.data import CocoDataset

    torch.manual_seed(0)
    dataset = CocoDataset(synthetic_root, split="val")
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=dataset.num_classes,
                        class_names=dataset.class_names)
    model.train()
    metrics = evaluation.evaluate_model(model, dataset, batch_size=4, workers=0, progress=False)
    assert model.training, "evaluate_model must restore the training mode"
    for name in evaluation.METRIC_NAMES:
        value = metrics[name]
        assert value is None or (0.0 <= value <= 1.0 and not math.isnan(value)), (name, value)
    assert metrics["AP"] is not None and metrics["AR100"] is not None
    assert metrics["num_images"] == 8 and metrics["results"]
    assert {det["image_id"] for det in metrics["results"]} <= set(dataset.image_ids)

    report = evaluation.write_report(metrics, tmp_path, dataset=dataset, sample_images=4, show_gt=True)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["AP"] == metrics["AP"] and "results" not in saved
    assert (tmp_path / "samples.png").stat().st_size > 0 and "samples.png" in report.read_text()


def test_cli_evaluates_a_checkpoint(synthetic_root, tmp_path, capsys):
    from ssd_core import build_model
    from ssd_core.zoo import checkpoint_payload

    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=7,
                        class_names=["__background__", "circle", "square", "triangle", "star", "ring", "cross"])
    weights = tmp_path / "last.pt"
    torch.save(checkpoint_payload(model), weights)
    out = tmp_path / "report"
    assert ssd_main(["eval", "--weights", str(weights), "--data", str(synthetic_root), "--output", str(out),
                     "--batch-size", "2", "--workers", "0", "--max-images", "2", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_images"] == 2 and all(name in saved for name in evaluation.METRIC_NAMES)
    assert "AR100" in printed and "report:" in printed
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "results.json", "report.md", "pr_curves.png",
                                                "samples.png"}


def test_no_images_to_score_is_an_error_not_all_images(coco_files):
    _, gt_path, dt_path = coco_files
    with pytest.raises(ValueError, match="no images"):
        evaluation.coco_metrics(gt_path, dt_path, image_ids=[])
    only_first = evaluation.coco_metrics(gt_path, [], image_ids=[10])
    assert only_first["num_images"] == 1


def test_confusion_matrix_counts_matches_confusions_misses_and_false_positives():
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]

    def box(image_id, category_id, bbox, iscrowd=0):
        return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
                "area": bbox[2] * bbox[3]}

    truth = [box(1, 3, [0, 0, 20, 20]), box(1, 7, [50, 50, 20, 20]), box(1, 3, [80, 0, 10, 10]),
             box(1, 3, [0, 60, 30, 30], iscrowd=1), box(2, 7, [10, 10, 40, 40]), box(3, 3, [0, 0, 50, 50])]
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3)],
          "annotations": [{**a, "id": n} for n, a in enumerate(truth, start=1)], "categories": categories}
    coco_gt = COCO()
    coco_gt.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    detections = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 20, 20], "score": 0.9},    # cat as cat
        {"image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "score": 0.8},  # the dog as cat (IoU 1)
        {"image_id": 1, "category_id": 7, "bbox": [51, 51, 20, 20], "score": 0.7},  # second on the dog: FP
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 20, 20], "score": 0.1},    # below the score threshold
        {"image_id": 1, "category_id": 3, "bbox": [2, 62, 20, 20], "score": 0.9},   # inside the crowd: ignored
        {"image_id": 2, "category_id": 3, "bbox": [60, 60, 10, 10], "score": 0.5},  # nothing there: FP
        {"image_id": 3, "category_id": 7, "bbox": [0, 0, 50, 50], "score": 0.9},    # image 3 not scored
    ]
    confusion = evaluation.confusion_matrix(coco_gt, detections, iou_threshold=0.5, score_threshold=0.25,
                                            image_ids=[1, 2])
    assert confusion["classes"] == ["cat", "dog", "background"]
    # rows: ground truth cat, dog, background (false positives); columns: detected as cat, dog, background (missed)
    assert confusion["matrix"] == [[1, 0, 1],
                                   [1, 0, 1],
                                   [1, 1, 0]]
    assert confusion["per_class"]["cat"] == {"ground_truth": 2, "detections": 3, "true_positives": 1,
                                             "precision": 1 / 3, "recall": 0.5}
    assert confusion["per_class"]["dog"]["precision"] == 0.0 and confusion["per_class"]["dog"]["recall"] == 0.0
    # Image 3 scored too: its cat detected as dog.
    assert evaluation.confusion_matrix(coco_gt, detections)["matrix"][0] == [1, 1, 1]


def test_report_has_confusion_matrix_and_per_class_counts(coco_files, tmp_path):
    _, gt_path, dt_path = coco_files
    metrics = evaluation.coco_metrics(gt_path, dt_path)
    evaluation.write_report(metrics, tmp_path, results=evaluation.load_results(dt_path), gt=gt_path, sample_images=0)
    saved = json.loads((tmp_path / "metrics.json").read_text())["confusion"]
    matrix = np.array(saved["matrix"])
    gt = json.loads(gt_path.read_text())
    non_crowd = [a for a in gt["annotations"] if not a["iscrowd"]]
    assert matrix[:-1].sum() == len(non_crowd)  # every ground-truth box lands in exactly one cell of its row
    for k, category in enumerate(sorted(gt["categories"], key=lambda c: c["id"])):
        assert matrix[k].sum() == sum(a["category_id"] == category["id"] for a in non_crowd)
    kept = [d for d in json.loads(dt_path.read_text()) if d["score"] >= 0.25]
    assert matrix[:, :-1].sum() <= len(kept)  # matched + false positives; detections on the crowd region ignored
    report = (tmp_path / "report.md").read_text()
    assert "| class | AP | AP50 | ground truth | detections | correct | precision | recall |" in report
    assert "(confusion.png)" in report
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.width > 300 and image.height > 300


def test_cli_evaluates_torchvision_weights_given_their_arch(synthetic_root, tmp_path, capsys):
    """torchvision's SSDLite state_dict through `ssd eval --arch`: the detections in results.json are
    torchvision's own on the same images, with its COCO labels mapped to the dataset's categories by name."""
    import shutil

    import torchvision

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    document = json.loads((root / "annotations" / "instances_val.json").read_text())
    coco_names = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train"]
    for category, name in zip(sorted(document["categories"], key=lambda c: c["id"]), coco_names):
        category["name"] = name
    (root / "annotations" / "instances_val.json").write_text(json.dumps(document))

    torch.manual_seed(0)
    reference = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                           num_classes=91)
    with torch.no_grad():  # spread the scores out (SSDLite's own init ties them all at 1/91)
        for module in reference.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
    weights = tmp_path / "torchvision_ssdlite.pt"
    torch.save(reference.state_dict(), weights)
    out = tmp_path / "report"
    args = ["eval", "--weights", str(weights), "--data", str(root), "--output", str(out), "--batch-size", "2",
            "--workers", "0", "--max-images", "2", "--samples", "0"]

    assert ssd_main(args) == 1  # not our checkpoint: the architecture must be named
    assert "--arch" in capsys.readouterr().err
    assert ssd_main([*args, "--arch", "ssdlite320_mobilenet_v3_large"]) == 0

    results = json.loads((out / "results.json").read_text())
    from ssd_core.data import CocoDataset

    dataset = CocoDataset(root, "val")
    category_of = {c["name"]: c["id"] for c in document["categories"]}
    tv_names = torchvision.models.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["categories"]
    reference.eval()
    for index in range(2):
        image, target = dataset[index]
        with torch.no_grad():
            expected = reference([image])[0]
        keep = [i for i, label in enumerate(expected["labels"].tolist()) if tv_names[label] in category_of]
        expected_top = sorted(((float(expected["scores"][i]), category_of[tv_names[int(expected["labels"][i])]],
                                expected["boxes"][i].tolist()) for i in keep), key=lambda t: -t[0])[:5]
        got = sorted((d for d in results if d["image_id"] == target["image_id"]), key=lambda d: -d["score"])[:5]
        assert expected_top and len(got) == len(expected_top)
        for (score, category_id, (x1, y1, x2, y2)), detection in zip(expected_top, got):
            assert detection["category_id"] == category_id
            assert detection["score"] == pytest.approx(score, abs=1e-4)
            assert detection["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.05)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_images"] == 2 and saved["confusion"]["classes"][-1] == "background"


def test_report_to_s3_is_uploaded_whole(coco_files, tmp_path, s3_bucket, moto_s3):  # noqa: F811
    """An s3:// report folder holds the same files as a local one (read back with boto3)."""
    import boto3

    _, gt_path, dt_path = coco_files
    metrics = evaluation.coco_metrics(gt_path, dt_path)
    results = evaluation.load_results(dt_path)
    local = evaluation.write_report(metrics, tmp_path / "local", results=results, gt=gt_path, sample_images=0)
    remote = evaluation.write_report(metrics, f"s3://{s3_bucket}/reports/r1", results=results, gt=gt_path,
                                     sample_images=0)
    assert remote == f"s3://{s3_bucket}/reports/r1/report.md"
    client = boto3.client("s3", endpoint_url=moto_s3)
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="reports/r1/")["Contents"]
    assert sorted(obj["Key"].rsplit("/", 1)[-1] for obj in listed) == sorted(p.name for p in local.parent.iterdir())
    body = client.get_object(Bucket=s3_bucket, Key="reports/r1/report.md")["Body"].read().decode()
    assert body == local.read_text()
