"""`ssd bench learn`: time-budgeted and step-count training, torchvision's run beside ours, the ablation
loop, the fp32/bf16 comparison and the sub-command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from ssd_core.bench import learn as learn_module
from ssd_core.bench.learn import (
    LEARN_RECIPE,
    ablate,
    ablation_table,
    compare_precisions,
    learn,
    parse_variant,
    side_by_side,
)
from ssd_core.commands.bench import register
from ssd_core.data import write_synthetic_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("learn") / "data", 16, 6, seed=11, progress=False)


@pytest.mark.slow
def test_learn_stops_at_the_time_budget_and_reports(tiny_data, tmp_path):
    """A 6-second budget: training stops on time (not at the epoch limit), the cosine schedule is spent,
    the run leaves last.pt and learn.json, and the fp32/bf16 comparison is filled in."""
    output = tmp_path / "run"
    report = learn(
        str(tiny_data), str(output), minutes=0.1, batch_size=4, model={"size": [96, 96]}, workers=0,
        eval_max_images=None, loader_probe_batches=0, progress=False, threads=1, warmup_iters=1, anchor=False,
    )
    assert 6.0 <= report["train_time_s"] < 6.0 + 30.0  # one step past the deadline at most
    assert report["steps"] >= 1 and report["epochs_done"] < LEARN_RECIPE["epochs"]
    assert (output / "last.pt").exists() and (output / "curves.png").exists()
    saved = json.loads((output / "learn.json").read_text())
    assert saved["reached_target"] == ((saved["metrics"]["AP50"] or 0.0) >= saved["target_AP50"])
    assert saved["recipe"]["time_budget_s"] == pytest.approx(6.0)
    comparison = saved["precision_comparison"]
    assert set(comparison["metrics"]) == {"fp32", "bf16"}
    gap = abs((comparison["metrics"]["fp32"]["AP"] or 0) - (comparison["metrics"]["bf16"]["AP"] or 0)) * 100
    assert comparison["gap_points"]["AP"] == pytest.approx(gap)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # The schedule runs on training time: by the deadline the cosine has (nearly) reached zero.
    assert train[-1]["lr"] < 0.25 * LEARN_RECIPE["lr"]
    assert [r for r in records if r["kind"] == "eval"][-1]["step"] == report["steps"]


def test_learn_for_a_step_count_beside_torchvision(tiny_data, tmp_path, monkeypatch):
    """--steps: both sides train exactly that many steps, our cosine ends at zero on the last one, and the
    report holds torchvision's run and the difference of every column."""
    monkeypatch.setitem(learn_module.TORCHVISION_RECIPE, "batch_size", 2)  # 320 px: keep the anchor's steps cheap
    output = tmp_path / "run"
    report = learn(
        str(tiny_data), str(output), steps=3, compare=False, batch_size=2, model={"size": [96, 96]}, workers=0,
        eval_max_images=4, loader_probe_batches=0, progress=False, threads=1, warmup_iters=1, log_every=1,
    )
    assert report["steps"] == 3 and report["torchvision"]["steps"] == 3
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r for r in records if r["kind"] == "train"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    ours, theirs = report["metrics"], report["torchvision"]["metrics"]
    assert report["difference"]["AP50"] == pytest.approx((ours["AP50"] or 0) - (theirs["AP50"] or 0))
    assert report["difference"]["steps"] == 0
    assert json.loads((output / "learn.json").read_text())["torchvision"]["steps"] == 3
    table = side_by_side(report).splitlines()
    assert [line.split()[0] for line in table[1:]] == ["ssd_core", "torchvision", "difference"]


def test_ablate_trains_each_variant_on_each_dataset_once(tmp_path, monkeypatch):
    datasets = [str(write_synthetic_dataset(tmp_path / f"seed{s}", 4, 3, seed=s, progress=False)) for s in (21, 22)]
    options = dict(batch_size=2, model={"size": [96, 96]}, workers=0, loader_probe_batches=0, threads=1,
                   warmup_iters=1)
    rows = ablate(datasets, str(tmp_path / "ablation"), steps=1, variants=["base", "augment=flip"], progress=False,
                  **options)
    assert [r["variant"] for r in rows] == ["base", "augment=flip"]
    for row in rows:
        assert row["steps"] == 1 and row["datasets"] == ["seed21", "seed22"]
        assert row["AP"] == pytest.approx(sum(v or 0.0 for v in row["AP per dataset"]) / 2)
    saved = json.loads((tmp_path / "ablation" / "augment-flip" / "seed22" / "config.json").read_text())
    assert saved["augment"] == "flip" and saved["train_steps"] == 1
    # Finished runs are read back, not trained again.
    monkeypatch.setattr(learn_module, "learn", lambda *a, **k: pytest.fail("trained a finished run again"))
    assert ablate(datasets, str(tmp_path / "ablation"), steps=1, variants=["base", "augment=flip"],
                  progress=False, **options) == rows
    assert ablation_table(rows).count("\n| ") == 2


def test_parse_variant():
    assert parse_variant("base") == {}
    assert parse_variant("size=224,lr=0.1,augment=flip,grad_clip=none,model.min_ratio=0.1") == {
        "model": {"size": [224, 224], "min_ratio": 0.1}, "lr": 0.1, "augment": "flip", "grad_clip": None}
    with pytest.raises(ValueError, match="'colour' is not a training option"):
        parse_variant("colour=red")
    with pytest.raises(ValueError, match="expected key=value"):
        parse_variant("lr")


def test_compare_precisions_on_a_checkpoint(tiny_data, tmp_path):
    from ssd_core.checkpoint import write_checkpoint
    from ssd_core.data import CocoDataset
    from ssd_core.zoo import build_model
    from ssd_core.zoo import checkpoint_payload as model_payload

    torch.manual_seed(0)
    names = CocoDataset(str(tiny_data), "val").class_names
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=len(names), class_names=names, size=(96, 96))
    path = str(tmp_path / "model.pt")
    write_checkpoint(path, model_payload(model, {"size": [96, 96]}))
    comparison = compare_precisions(path, str(tiny_data), workers=0, max_images=3)
    fp32, bf16 = comparison["metrics"]["fp32"], comparison["metrics"]["bf16"]
    assert set(fp32) >= {"AP", "AP50"} and set(bf16) >= {"AP", "AP50"}
    expected = 100 * abs((fp32["AP50"] or 0.0) - (bf16["AP50"] or 0.0))
    assert comparison["gap_points"]["AP50"] == pytest.approx(expected)


def test_bench_command_has_learn_with_its_options():
    parser = argparse.ArgumentParser(prog="ssd")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "learn", "--data", "D", "--output", "R", "--minutes", "2.5", "--size", "192"])
    assert (args.bench, args.data, args.output, args.minutes, args.size) == ("learn", ["D"], "R", 2.5, 192)
    assert callable(args.func)
    defaults = parser.parse_args(["bench", "learn", "--data", "D", "--output", "R"])
    assert (defaults.minutes, defaults.steps, defaults.no_anchor, defaults.ablate) == (15.0, None, False, None)
    ablation = parser.parse_args(["bench", "learn", "--data", "A", "B", "--output", "R", "--steps", "200", "--ablate",
                                  "base", "size=224,lr=0.1", "--no-anchor"])
    assert (ablation.data, ablation.steps, ablation.ablate, ablation.no_anchor) == (
        ["A", "B"], 200, ["base", "size=224,lr=0.1"], True)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "learn", "--output", "R"])  # --data is required
