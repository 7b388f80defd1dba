"""`ssd bench learn`: time-budgeted training, its report, the fp32/bf16 comparison and the sub-command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from ssd_core.data import write_synthetic_dataset
from ssd_core.learn import LEARN_RECIPE, compare_precisions, learn, register_bench


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
        eval_max_images=None, loader_probe_batches=0, progress=False, threads=1, warmup_iters=1,
    )
    assert 6.0 <= report["train_time_s"] < 6.0 + 30.0  # one step past the deadline at most
    assert report["steps"] >= 1 and report["epochs_done"] < LEARN_RECIPE["epochs"]
    assert (output / "last.pt").exists() and (output / "curves.png").exists()
    saved = json.loads((output / "learn.json").read_text())
    assert saved["reached_target"] == ((saved["metrics"]["AP50"] or 0.0) >= 0.7)
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


def test_register_bench_adds_learn_with_its_options():
    parser = argparse.ArgumentParser(prog="ssd bench")
    register_bench(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(["learn", "--data", "D", "--output", "R", "--minutes", "2.5", "--size", "192"])
    assert (args.bench, args.data, args.output, args.minutes, args.size) == ("learn", "D", "R", 2.5, 192)
    assert callable(args.func)
    assert parser.parse_args(["learn", "--data", "D", "--output", "R"]).minutes == 15.0
    with pytest.raises(SystemExit):
        parser.parse_args(["learn", "--output", "R"])  # --data is required
