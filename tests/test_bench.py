"""`ssd bench`: the side-by-side benchmarks run end to end at tiny sizes and report consistent figures.

No timing is asserted (this machine is shared); what is checked is that each variant really ran on the same
inputs, that ratios are the ratios of the reported medians, and that the bulk benchmark's pipeline wrote
every image of its bucket.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from s3_server import moto_s3, ray_local  # noqa: F401

from ssd_core import build_model
from ssd_core.bench.speed import alternate, bench_infer, bench_train
from ssd_core.cli import main as cli_main
from ssd_core.inference import optimize_for_inference

ARCH = "ssdlite320_mobilenet_v3_large"


def test_alternate_interleaves_the_variants():
    calls: list[str] = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert {name: len(samples) for name, samples in times.items()} == {"a": 3, "b": 3}


def test_bench_infer_reports_every_variant_and_consistent_ratios():
    result = bench_infer(ARCH, batch_size=1, repeats=1, height=96, width=128, int8=True)
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) >= {"torchvision_fp32", "torchvision_bf16_autocast", "ssd_core_fp32", "ssd_core_int8"}
    (auto,) = [name for name in rows if name.startswith("ssd_core_auto(")]
    assert result["ratio_auto_vs_torchvision_fp32"] == pytest.approx(
        rows["torchvision_fp32"]["median_s"] / rows[auto]["median_s"])
    assert result["ratio_int8_vs_auto"] == pytest.approx(rows[auto]["median_s"] / rows["ssd_core_int8"]["median_s"])
    assert all(row["images_per_s"] == pytest.approx(1 / row["median_s"]) for row in rows.values())
    post = {row["variant"]: row for row in result["postprocess"]["rows"]}
    assert result["postprocess"]["ratio"] == pytest.approx(post["torchvision"]["median_s"] / post["ssd_core"]["median_s"])


def test_bench_breakdown_times_each_stage_of_both_copies():
    """bf16 and int8 (its network compiled for the benchmark's batch) stage by stage; the whole-pass
    ratio is that of the stages' sums."""
    from ssd_core.bench.int8 import STAGES, bench_breakdown, conv_time_by_kind

    result = bench_breakdown(ARCH, batch_size=2, repeats=1, height=96, width=128)
    assert result["int8_compiled_batch_size"] == 2
    stages = {row["stage"]: row for row in result["stages"]}
    assert tuple(stages) == STAGES
    for row in stages.values():
        assert row["bf16_s"] > 0 and row["int8_s"] > 0
        assert row["int8_speedup"] == pytest.approx(row["bf16_s"] / row["int8_s"])
    summed = {key: sum(row[key] for row in stages.values()) for key in ("bf16_s", "int8_s")}
    assert result["ratio_int8_vs_bf16_stages_summed"] == pytest.approx(summed["bf16_s"] / summed["int8_s"])
    # Every convolution of the model is found in both copies' kernel calls, with its kind.
    model = build_model(ARCH, weights=None, weights_backbone=None)
    expected: dict[str, int] = {}
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        kind = ("depthwise" if conv.groups == conv.in_channels > 1 else
                "pointwise 1x1" if conv.kernel_size == (1, 1) else "full kxk")
        expected[kind] = expected.get(kind, 0) + 1
    assert {row["convolutions"]: row["count"] for row in result["convolutions"]} == expected
    assert set(expected) == {"depthwise", "pointwise 1x1", "full kxk"}
    for row in result["convolutions"]:
        assert row["bf16_s"] > 0 and row["int8_speedup"] == pytest.approx(row["bf16_s"] / row["int8_s"])
    bf16 = optimize_for_inference(model.eval(), "bf16")
    with torch.inference_mode():
        counted = conv_time_by_kind(bf16, torch.rand(1, 3, *model.size), repeats=2)
    assert {kind: count for kind, (_, count) in counted.items() if count} == expected


def test_bench_breakdown_needs_int8_on_the_cpu(capsys):
    assert cli_main(["bench", "infer", "--arch", ARCH, "--breakdown"]) == 1
    assert "--breakdown compares bf16 with int8 on the CPU" in capsys.readouterr().err


def test_bench_train_steps_every_variant():
    result = bench_train(ARCH, batch_size=2, repeats=1, height=96, width=128)  # BatchNorm needs 2 samples
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) >= {"torchvision_fp32", "torchvision_bf16_autocast", "ssd_core_fp32"}
    auto = next(name for name in rows if name.startswith("ssd_core_auto"))
    assert result["ratio_auto_vs_torchvision_autocast"] == pytest.approx(
        rows["torchvision_bf16_autocast"]["median_s"] / rows[auto]["median_s"])


@pytest.mark.slow
def test_bench_detect_cli_runs_the_pipeline_model_and_naive_loop(tmp_path, ray_local):  # noqa: F811
    from ssd_core.bulk import read_ledger

    out = tmp_path / "figures.json"
    code = cli_main(["bench", "detect", "--images", "16", "--model-images", "8", "--naive-images", "2",
                     "--batch-size", "4", "--repeats", "1", "--work-dir", str(tmp_path / "work"),
                     "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    rates = result["images_per_s"]
    assert all(rates[name] > 0 for name in ("pipeline", "pipeline_quarter", "model_only", "naive",
                                            "read_decode_resize_per_cpu"))
    # A run this small may be start-up only (the 16 images no slower than the 4): then no steady split.
    if not math.isnan(rates["steady"]):
        assert rates["steady"] > 0
        assert rates["steady_per_actor"] == pytest.approx(rates["steady"] / result["actors"], rel=1e-2)
    assert result["quarter_images"] == 4
    # Ratios are rounded to 3 decimals (up to 5e-4 off), and these tiny runs give ratios of a few hundredths.
    for ratio, num, den in (("quarter_efficiency_vs_model", "pipeline_quarter", "model_only"),
                            ("efficiency_vs_model", "pipeline", "model_only"),
                            ("speedup_vs_naive", "pipeline", "naive")):
        assert result[ratio] == pytest.approx(rates[num] / rates[den], rel=1e-2, abs=1e-3), ratio
    ledger = read_ledger(str(tmp_path / "work" / "out-0"))
    assert ledger.num_rows == 16 and set(ledger["status"].to_pylist()) == {"ok"}
    assert len(list((tmp_path / "work" / "naive-0").glob("*.json"))) == 2


def test_bench_detect_parser_defaults():
    from ssd_core.commands.bench import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "detect"])
    assert (args.arch, args.batch_size, args.precision) == (ARCH, 16, "auto")
    assert args.images >= 4 * args.batch_size  # the quarter-bucket run needs whole batches


@pytest.mark.slow
def test_bench_ledger_cli_measures_a_nothing_new_run_in_a_fresh_process(tmp_path):
    out = tmp_path / "ledger.json"
    code = cli_main(["bench", "ledger", "--objects", "300", "--rows-per-file", "64", "--work-dir",
                     str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    (row,) = json.loads(out.read_text())["rows"]
    # The child run saw every object of the manifest and found all of them in the ledger (checked by the
    # bench itself too), and measured its own process and its Ray workers.
    assert (row["objects"], row["images_seen"], row["images_new"], row["ledger_files"]) == (300, 300, 0, 5)
    assert row["driver_peak_rss_mib"] > 0 and row["worker_peak_rss_mib"] > 0 and row["seconds"] > 0
