"""`ssd data convert`: Pascal VOC and YOLO datasets to COCO, boxes checked exactly both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from ssd_core.cli import main
from ssd_core.data import CocoDataset
from ssd_core.data.convert import coco_box_to_voc, coco_box_to_yolo

# (file, width, height, objects: (name, xmin, ymin, xmax, ymax, difficult, truncated)) in VOC's 1-based,
# inclusive pixel indices. The second image's person spans the whole width: pixels 1..W.
VOC_IMAGES = [
    ("2008_000001.jpg", 120, 80, [("dog", 1, 1, 10, 20, 1, 0), ("person", 48, 24, 100, 80, 0, 1)]),
    ("2008_000002.jpg", 100, 60, [("person", 1, 5, 100, 60, 0, 0)]),
    ("2008_000003.jpg", 64, 64, [("cat", 7, 9, 7, 9, 0, 0)]),  # a single pixel
]


def voc_xml(name: str, width: int, height: int, objects) -> str:
    parts = [f"<annotation><folder>VOC2012</folder><filename>{name}</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for label, xmin, ymin, xmax, ymax, difficult, truncated in objects:
        parts.append(f"<object><name>{label}</name><pose>Left</pose><truncated>{truncated}</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def voc_root(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for name, width, height, objects in VOC_IMAGES:
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / "JPEGImages" / name)
        (root / "Annotations" / f"{Path(name).stem}.xml").write_text(voc_xml(name, width, height, objects))
    (root / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000003\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("2008_000002\n")
    return root


def test_voc_boxes_flags_and_splits_convert_exactly(voc_root, tmp_path, capsys):
    out = tmp_path / "coco"
    # SRC may be the VOCdevkit folder holding a single VOC20xx folder.
    assert main(["data", "convert", "--from", "voc", str(voc_root.parent), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == {"images": 2, "boxes": 3} and summary["val"] == {"images": 1, "boxes": 1}

    expected = {name: objects for name, _, _, objects in VOC_IMAGES}
    for split in ("train", "val"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "person"]  # sorted
        for image in coco.loadImgs(coco.getImgIds()):
            assert (out / split / image["file_name"]).exists()
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            objects = expected[image["file_name"]]
            assert len(annotations) == len(objects)
            for annotation, (label, xmin, ymin, xmax, ymax, difficult, truncated) in zip(annotations, objects):
                assert coco.loadCats(annotation["category_id"])[0]["name"] == label
                # 1-based inclusive indices: the box starts at the left edge of pixel xmin, ends at the right
                # edge of pixel xmax; its area is the VOC devkit's (xmax - xmin + 1) * (ymax - ymin + 1).
                assert annotation["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
                assert annotation["area"] == (xmax - xmin + 1) * (ymax - ymin + 1)
                assert coco_box_to_voc(*annotation["bbox"]) == [xmin, ymin, xmax, ymax]  # the round trip
                assert annotation["attributes"] == {"difficult": bool(difficult), "truncated": bool(truncated),
                                                    "pose": "Left"}
    # What training sees: nothing clipped or dropped, a full-width box spans [0, W].
    val = CocoDataset(out, "val")
    assert val.skipped_counts == {"crowd": 0, "dropped": 0, "clipped": 0}
    assert val.annotations(0)[0].tolist() == [[0.0, 4.0, 100.0, 60.0]]
    assert CocoDataset(out, "train").skipped_counts == {"crowd": 0, "dropped": 0, "clipped": 0}

    # Converting into a folder that already holds a dataset is refused.
    assert main(["data", "convert", "--from", "voc", str(voc_root), "--output", str(out)]) == 1
    assert "already holds a dataset" in capsys.readouterr().err


def test_voc_without_split_lists_is_split_by_fraction(voc_root, tmp_path, capsys):
    for path in (voc_root / "ImageSets" / "Main").iterdir():
        path.unlink()
    out = tmp_path / "coco"
    assert main(["data", "convert", "--from", "voc", str(voc_root), "--output", str(out), "--val-fraction",
                 "0.34"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train"]["images"], summary["val"]["images"]) == (2, 1)


def write_png(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 200, 30)).save(path)
    return path


def test_yolo_with_data_yaml_converts_boxes_exactly(tmp_path, capsys):
    src = tmp_path / "yolo"
    write_png(src / "images" / "train" / "a.png", 512, 256)
    write_png(src / "images" / "train" / "b.png", 320, 240)
    write_png(src / "images" / "val" / "c.png", 64, 32)  # no label file: an image without objects
    (src / "labels" / "train").mkdir(parents=True)
    # Dyadic fractions are exact in binary floating point, so the conversion must be exact too.
    (src / "labels" / "train" / "a.txt").write_text("0 0.25 0.5 0.125 0.25\n1 0.75 0.5 0.5 1.0\n")
    # A 6-decimal line as YOLO tools write them, and a polygon (segmentation) line.
    (src / "labels" / "train" / "b.txt").write_text("1 0.504688 0.491667 0.253125 0.416667\n"
                                                    "0 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n")
    (src / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n")

    out = tmp_path / "coco"
    assert main(["data", "convert", "--from", "yolo", str(src), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == {"images": 2, "boxes": 4} and summary["val"] == {"images": 1, "boxes": 0}

    coco = COCO(str(out / "annotations" / "instances_train.json"))
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {1: "cat", 2: "dog"}  # class k -> id k+1
    by_file = {image["file_name"]: coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
               for image in coco.loadImgs(coco.getImgIds())}
    a = by_file["a.png"]
    assert [(x["category_id"], x["bbox"]) for x in a] == [(1, [96.0, 96.0, 64.0, 64.0]), (2, [256.0, 0.0, 256.0, 256.0])]
    assert coco_box_to_yolo(*a[0]["bbox"], 512, 256) == [0.25, 0.5, 0.125, 0.25]
    assert coco_box_to_yolo(*a[1]["bbox"], 512, 256) == [0.75, 0.5, 0.5, 1.0]
    b = by_file["b.png"]
    # Pixel box x 121, y 68, w 81, h 100 on 320 x 240, written with 6 decimals: exact to the file's precision.
    assert b[0]["bbox"] == pytest.approx([121, 68, 81, 100], abs=320 * 1e-6)
    assert coco_box_to_yolo(*b[0]["bbox"], 320, 240) == pytest.approx([0.504688, 0.491667, 0.253125, 0.416667],
                                                                       abs=1e-12)
    assert b[1]["category_id"] == 1 and b[1]["bbox"] == pytest.approx([32, 24, 64, 72])  # polygon extent


def test_yolo_flat_folder_with_classes_txt(tmp_path, capsys):
    src = tmp_path / "yolo"
    for index in range(5):
        write_png(src / "images" / f"{index}.png", 100, 100)
        (src / "labels").mkdir(exist_ok=True)
        (src / "labels" / f"{index}.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    (src / "classes.txt").write_text("plane\nboat\n")
    out = tmp_path / "coco"
    assert main(["data", "convert", "--from", "yolo", str(src), "--output", str(out), "--val-fraction", "0.2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["train"]["images"], summary["val"]["images"]) == (4, 1)
    dataset = CocoDataset(out, "train")
    assert dataset.class_names == ["__background__", "plane", "boat"]
    boxes, labels = dataset.annotations(0)
    assert boxes.tolist() == [[40.0, 40.0, 60.0, 60.0]] and labels.tolist() == [2]

    (src / "labels" / "0.txt").write_text("2 0.5 0.5 0.2 0.2\n")  # no class 2 among 2 names
    assert main(["data", "convert", "--from", "yolo", str(src), "--output", str(tmp_path / "again")]) == 1
    assert "0.txt:1: class 2 is not in the 2 class names" in capsys.readouterr().err
