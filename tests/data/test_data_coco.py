"""CocoDataset against pycocotools (the independent reader) and hand-made edge cases."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from dataset_layouts import as_coco2017
from PIL import Image
from pycocotools.coco import COCO

from ssd_core.data import CocoDataset, detections_to_coco_results
from ssd_core.data.coco import UnreadableImageError, split_paths

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 40, "name": "bird"}]


def test_synthetic_dataset_agrees_with_pycocotools(synth_dir):
    dataset = CocoDataset(synth_dir, "train")
    reference = COCO(str(synth_dir / "annotations" / "instances_train.json"))
    assert dataset.image_ids == reference.getImgIds()
    assert len(dataset) == len(reference.imgs)
    assert dataset.class_names == ["__background__"] + [
        c["name"] for c in reference.loadCats(sorted(reference.getCatIds()))
    ]
    assert dataset.coco.getAnnIds() == reference.getAnnIds()
    for index in range(len(dataset)):
        image, target = dataset[index]
        info = reference.imgs[dataset.image_ids[index]]
        annotations = reference.loadAnns(reference.getAnnIds(imgIds=info["id"], iscrowd=False))
        assert image.dtype == torch.float32 and image.shape == (3, info["height"], info["width"])
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert target["image_id"] == info["id"] and target["orig_size"] == (info["height"], info["width"])
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        expected = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        expected[:, 2:] += expected[:, :2]
        np.testing.assert_allclose(target["boxes"].numpy(), expected, atol=1e-4)
        categories = [dataset.label_to_category_id[label] for label in target["labels"].tolist()]
        assert categories == [a["category_id"] for a in annotations]


def test_category_mapping_round_trip(tmp_path, coco_writer):
    images = [{"id": 10, "file_name": "a.png", "width": 50, "height": 40}]
    annotations = [
        {"id": i + 1, "image_id": 10, "category_id": cid, "bbox": [1, 1, 10, 10], "iscrowd": 0}
        for i, cid in enumerate([40, 2, 7])
    ]
    dataset = CocoDataset(coco_writer(tmp_path, images, annotations, CATEGORIES), "train")
    assert dataset.class_names == ["__background__", "dog", "cat", "bird"]
    assert dataset.label_to_category_id == [0, 2, 7, 40]
    assert dataset.category_id_to_label == {2: 1, 7: 2, 40: 3}
    _, target = dataset[0]
    assert target["labels"].tolist() == [3, 1, 2]
    assert [dataset.label_to_category_id[label] for label in target["labels"].tolist()] == [40, 2, 7]


def test_crowd_degenerate_clipped_and_empty_images(tmp_path, coco_writer, caplog):
    images = [
        {"id": 1, "file_name": "a.png", "width": 100, "height": 80},
        {"id": 2, "file_name": "b.png", "width": 60, "height": 60},  # no boxes at all
        {"id": 3, "file_name": "c.png", "width": 60, "height": 60},  # only a crowd box
    ]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [90, 70, 30, 30], "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [150, 10, 10, 10], "iscrowd": 0},  # outside
        {"id": 5, "image_id": 3, "category_id": 40, "bbox": [0, 0, 30, 30], "iscrowd": 1},  # crowd
    ]
    root = coco_writer(tmp_path, images, annotations, CATEGORIES)
    with caplog.at_level(logging.WARNING, logger="ssd_core.data.coco"):
        dataset = CocoDataset(root, "train")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 crowd" in warnings[0].getMessage() and "2 degenerate" in warnings[0].getMessage()
    assert "clipped 1" in warnings[0].getMessage()
    assert dataset.skipped_counts == {"crowd": 1, "dropped": 2, "clipped": 1}
    assert len(dataset) == 3
    _, first = dataset[0]
    torch.testing.assert_close(
        first["boxes"], torch.tensor([[10.0, 10.0, 30.0, 30.0], [90.0, 70.0, 100.0, 80.0]])
    )
    assert first["labels"].tolist() == [2, 1]
    for index in (1, 2):
        image, target = dataset[index]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert image.shape == (3, 60, 60)
    # the ground truth for evaluation keeps everything, crowd included
    assert len(dataset.coco.getAnnIds()) == 5 and dataset.coco.getAnnIds(iscrowd=True) == [5]


@pytest.mark.parametrize(
    ("break_document", "expected"),
    [
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 11 has bbox"),
        (lambda d: d["annotations"][0].update(bbox=[1, "2", 3, 4]), "annotation id 11 has bbox"),
        (lambda d: d["annotations"][0].update(category_id=99), "annotation id 11 has unknown category_id 99"),
        (lambda d: d["annotations"][0].update(image_id=5), "annotation id 11 has unknown image_id 5"),
        (lambda d: d["annotations"][0].pop("bbox"), "annotation id 11 is missing required key(s) ['bbox']"),
        (lambda d: d["images"][0].pop("file_name"), "image id 1 is missing required key(s) ['file_name']"),
        (lambda d: d.pop("categories"), "missing required key(s) ['categories']"),
        (lambda d: d["images"][0].update(id="one"), "image id 'one' is not an integer"),
        (lambda d: d["images"][0].update(width=None), "image id 1 has a non-numeric width/height"),
    ],
)
def test_broken_annotation_file_names_file_and_record(tmp_path, coco_writer, break_document, expected):
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}]
    annotations = [{"id": 11, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    root = coco_writer(tmp_path, images, annotations, CATEGORIES)
    path = root / "annotations" / "instances_train.json"
    document = json.loads(path.read_text())
    break_document(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError) as error:
        CocoDataset(root, "train")
    assert str(path) in str(error.value) and expected in str(error.value)


def test_invalid_json_and_missing_files(tmp_path, coco_writer):
    images = [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 20},
        {"id": 2, "file_name": "gone.png", "width": 20, "height": 20},
        {"id": 3, "file_name": "junk.jpg", "width": 20, "height": 20},
    ]
    root = coco_writer(tmp_path, images, [], CATEGORIES)
    (root / "train" / "gone.png").unlink()
    (root / "train" / "junk.jpg").write_bytes(b"not an image at all")
    dataset = CocoDataset(root, "train")
    assert dataset[0][0].shape == (3, 20, 20)
    # Missing and undecodable images raise the one error that training skips (unless --strict).
    with pytest.raises(UnreadableImageError, match=r"gone\.png: image file for image id 2 not found"):
        dataset[1]
    with pytest.raises(UnreadableImageError, match=r"junk\.jpg.*image id 3"):
        dataset[2]
    with pytest.raises(FileNotFoundError, match=r"instances_val\.json"):
        CocoDataset(root, "val")
    path = root / "annotations" / "instances_train.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"instances_train\.json: invalid JSON"):
        CocoDataset(root, "train")


def test_exif_orientation_is_applied(tmp_path, coco_writer):
    # Stored 40 wide x 20 high, EXIF says rotate 90 degrees: displayed 20 wide x 40 high.
    images = [{"id": 1, "file_name": "rotated.jpg", "width": 20, "height": 40}]
    root = coco_writer(tmp_path, images, [], CATEGORIES, write_files=False)
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :10] = 255  # white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    Image.fromarray(stored).save(root / "train" / "rotated.jpg", exif=exif, quality=95)
    image, target = CocoDataset(root, "train")[0]
    assert image.shape == (3, 40, 20) and target["orig_size"] == (40, 20)
    assert float(image[:, :10].mean()) > 0.9 and float(image[:, 30:].mean()) < 0.1  # band now on top


def test_detections_to_coco_results_loads_in_pycocotools(synth_dir):
    dataset = CocoDataset(synth_dir, "val")
    detections, image_ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        detections.append(
            {
                "boxes": target["boxes"],
                "labels": target["labels"],
                "scores": torch.linspace(1.0, 0.5, len(target["labels"])),
            }
        )
        image_ids.append(target["image_id"])
    detections.append(
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    )
    image_ids.append(dataset.image_ids[0])
    results = detections_to_coco_results(detections, image_ids, dataset.label_to_category_id)
    assert len(results) == len(dataset.coco.getAnnIds())
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    # perfect detections give AP 1 by pycocotools' own evaluation
    from pycocotools.cocoeval import COCOeval

    evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0, abs=1e-6)


def test_other_image_formats_and_pickling(tmp_path, coco_writer):
    images = [
        {"id": 1, "file_name": "deep.png", "width": 8, "height": 6},
        {"id": 2, "file_name": "grey.bmp", "width": 8, "height": 6},
    ]
    root = coco_writer(tmp_path, images, [], CATEGORIES, write_files=False)
    Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16)).save(root / "train" / "deep.png")  # 16-bit grey
    Image.fromarray(np.full((6, 8), 51, dtype=np.uint8)).save(root / "train" / "grey.bmp")
    dataset = CocoDataset(root, "train")
    clone = pickle.loads(pickle.dumps(dataset))  # what spawn-started workers and Ray receive
    for ds in (dataset, clone):
        bright, _ = ds[0]
        grey, _ = ds[1]
        assert bright.shape == grey.shape == (3, 6, 8)
        torch.testing.assert_close(bright, torch.ones(3, 6, 8))
        torch.testing.assert_close(grey, torch.full((3, 6, 8), 0.2))


def test_coco2017_layout_and_explicit_paths_read_the_same_split(synth_dir, tmp_path):
    coco2017 = as_coco2017(synth_dir, tmp_path / "coco")
    assert split_paths(str(coco2017), "val") == (f"{coco2017}/annotations/instances_val2017.json",
                                                 f"{coco2017}/val2017")
    reference = CocoDataset(synth_dir, "val")
    detected = CocoDataset(coco2017, "val")
    explicit = CocoDataset(None, "val", annotation_file=str(synth_dir / "annotations" / "instances_val.json"),
                           image_folder=str(coco2017 / "val2017"))
    for dataset in (detected, explicit):
        assert dataset.image_ids == reference.image_ids and dataset.class_names == reference.class_names
        for index in (0, len(reference) - 1):
            (image, target), (expected_image, expected_target) = dataset[index], reference[index]
            assert torch.equal(image, expected_image) and torch.equal(target["boxes"], expected_target["boxes"])
    # The project's own names win where both layouts are present.
    (coco2017 / "annotations" / "instances_val.json").write_text(
        (synth_dir / "annotations" / "instances_val.json").read_text())
    assert split_paths(str(coco2017), "val")[0].endswith("instances_val.json")
    with pytest.raises(ValueError, match="both annotation_file and image_folder"):
        CocoDataset(None, "val", annotation_file=str(synth_dir / "annotations" / "instances_val.json"))
