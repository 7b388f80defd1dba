"""`ssd data synth` and `ssd data stats` through the real CLI entry point."""

from __future__ import annotations

import json

from pycocotools.coco import COCO

from ssd_core.cli import main


def test_synth_then_stats(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "synth", str(out), "--num-train", "5", "--num-val", "3", "--seed", "2"]) == 0
    coco = COCO(str(out / "annotations" / "instances_val.json"))
    assert len(coco.getImgIds()) == 3 and len(list((out / "train").glob("*.jpg"))) == 5
    capsys.readouterr()
    assert main(["data", "stats", str(out), "--split", "val", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 3
    assert stats["boxes"] == len(coco.getAnnIds(iscrowd=False))
    assert sum(stats["boxes_per_scale"].values()) == stats["boxes"]
    assert list(stats["boxes_per_class"]) == [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
    assert main(["data", "stats", str(out)]) == 0  # both splits, as tables
    text = capsys.readouterr().out
    assert text.startswith("train: 5 images") and "\nval: 3 images" in text
    assert f"small (< 32x32) {stats['boxes_per_scale']['small']}, medium" in text


def test_stats_on_missing_dataset_is_one_line_error(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "nowhere")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("ssd data: error:")
    assert ("nowhere: annotation file not found for split 'train' (neither annotations/instances_train.json nor "
            "annotations/instances_train2017.json)") in error
    assert "\n" not in error
