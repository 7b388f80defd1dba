"""The training engine: optimisation pieces, reproducible batches, checkpoints, exact resume, learning, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from dataset_layouts import as_coco2017

from ssd_core.checkpoint import read_checkpoint
from ssd_core.cli import main
from ssd_core.data import CocoDataset, build_preset, write_synthetic_dataset
from ssd_core.engine import Runtime, fit, lr_factor, parameter_groups
from ssd_core.sampling import EpochSampler, SeededSamples, sample_seed
from ssd_core.train_config import TrainConfig
from ssd_core.zoo import build_model, load_model

ARCH = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "data", 24, 8, seed=3, progress=False)


def tiny_config(data: Path, output: Path, **changes) -> TrainConfig:
    values = dict(
        arch=ARCH, data=str(data), output=str(output), epochs=2, batch_size=4, lr=0.05, warmup_iters=3,
        precision="fp32", workers=0, seed=7, augment="ssd", model={"size": [96, 96]}, eval_every=0,
        eval_max_images=4, eval_batch_size=4, log_every=2, loader_probe_batches=0, progress=False, threads=1,
        weights_backbone=None,
    )
    values.update(changes)
    return TrainConfig(**values)


# -- optimisation pieces ---------------------------------------------------------------------------


def test_parameter_groups_exempt_norm_and_bias_from_weight_decay():
    model = build_model(ARCH, num_classes=3, size=(96, 96))
    decay, no_decay = parameter_groups(model, 4e-5)
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    expected_no_decay = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.BatchNorm2d) or name == "bias":
                expected_no_decay.add(id(param))
    assert no_decay_ids == expected_no_decay
    assert decay_ids.isdisjoint(no_decay_ids)
    assert decay_ids | no_decay_ids == {id(p) for p in model.parameters() if p.requires_grad}
    # Every decayed parameter is a conv/linear weight (>= 2-D); every BatchNorm scale is exempt.
    assert all(p.dim() >= 2 for p in decay["params"])
    bn_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn_weights and all(id(w) in no_decay_ids for w in bn_weights)

    # And SGD honours it: with zero gradients only the decayed group moves.
    optimizer = torch.optim.SGD([decay, no_decay], lr=1.0, momentum=0.0)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(p, before[id(p)]) for p in no_decay["params"])
    assert any(not torch.equal(p, before[id(p)]) for p in decay["params"])


def test_lr_factor_warmup_cosine_and_multistep():
    cosine = lr_factor(total_steps=100, warmup_iters=10, warmup_factor=0.001, schedule="cosine",
                       milestones=[], gamma=0.1)
    assert cosine(0) == pytest.approx(0.001)
    assert cosine(5) == pytest.approx(0.5005 * 0.5 * (1 + math.cos(math.pi * 0.05)))  # half-way up, 5% into decay
    assert cosine(50) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.0, abs=1e-12)
    steps = lr_factor(total_steps=120, warmup_iters=0, warmup_factor=0.001, schedule="multistep",
                      milestones=[80 / 120, 110 / 120], gamma=0.1)
    assert [steps(s) for s in (0, 79, 80, 109, 110, 119)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    timed = lr_factor(total_steps=1, warmup_iters=0, warmup_factor=1.0, schedule="cosine", milestones=[],
                      gamma=0.1, progress=lambda step: 0.5)
    assert timed(1000) == pytest.approx(0.5)  # time-budgeted: progress comes from the clock, not the step


def test_recipe_defaults_scale_with_batch_and_fill_in():
    config = TrainConfig(arch="ssd300_vgg16", data="d", batch_size=8, epochs=12).resolved(world_size=2)
    assert config.lr == pytest.approx(0.002 * 16 / 32)
    assert (config.weight_decay, config.schedule, config.augment) == (5e-4, "multistep", "ssd")
    assert config.milestones == [8, 11]  # epochs 80 and 110 of 120, scaled to 12
    nvidia = TrainConfig(arch="ssd300_resnet50", data="d", batch_size=32, epochs=65).resolved()
    assert (nvidia.lr, nvidia.milestones, nvidia.warmup_iters) == (pytest.approx(2.6e-3), [43, 54], 300)
    with pytest.raises(ValueError, match="unknown training options: bogus"):
        TrainConfig.from_dict({"bogus": 1})
    assert TrainConfig.from_dict(config.to_dict()) == config


# -- reproducible, resumable batches --------------------------------------------------------------------


def test_epoch_sampler_shards_resumes_and_depends_on_seed_and_epoch_only():
    shards = [EpochSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    orders = [s.order().tolist() for s in shards]
    assert all(len(o) == 4 for o in orders)  # 10 padded to 12, dealt round-robin
    assert set(sum(orders, [])) == set(range(10))
    whole = EpochSampler(10, seed=1)
    whole.set_epoch(4)
    full = list(whole)
    whole.set_epoch(4, start=6)
    assert list(whole) == full[6:]  # resuming skips exactly the samples already seen
    assert full == [(sample_seed(1, 4, i), i) for _, i in full]
    whole.set_epoch(5)
    assert [i for _, i in whole] != [i for _, i in full]
    assert [i for _, i in EpochSampler(10, seed=2)] != [i for _, i in EpochSampler(10, seed=1)]


def test_seeded_samples_reproduce_augmentation_and_leave_global_rng_alone(tiny_data):
    dataset = SeededSamples(CocoDataset(str(tiny_data), "train", transforms=build_preset("ssd", size=(96, 96))))
    rng_before = torch.get_rng_state()
    first, again = dataset[(123, 0)], dataset[(123, 0)]
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    other = [dataset[(seed, 0)][0] for seed in range(124, 130)]
    assert any(not torch.equal(first[0], image) for image in other)


# -- checkpoints --------------------------------------------------------------------------------------


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(tiny_data, tmp_path):
    result = fit(tiny_config(tiny_data, tmp_path / "run", epochs=1, max_steps=2))
    assert result["stop_reason"] == "max_steps" and result["step"] == 2
    path = tmp_path / "run" / "last.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["arch"] == ARCH and payload["num_classes"] == 7
    assert payload["state"]["step"] == 2 and payload["state"]["batch_in_epoch"] == 2
    assert payload["config"]["model"] == {"size": [96, 96]}
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(payload)
    assert set(payload["rng"]) >= {"torch", "numpy", "python"}
    assert payload["optimizer"]["state"]  # momentum buffers exist after two steps

    model = load_model(str(path))
    assert model.size == (96, 96) and model.class_names == CocoDataset(str(tiny_data), "val").class_names
    for key, value in model.state_dict().items():
        assert torch.equal(value, payload["model"][key]), key
    model.eval()
    with torch.inference_mode():
        detections = model([torch.rand(3, 120, 90)])
    assert detections[0]["boxes"].shape[-1] == 4


def test_failed_checkpoint_write_keeps_the_previous_last_pt(tmp_path, monkeypatch):
    runtime = Runtime(str(tmp_path))
    runtime.save_checkpoint({"state": {"step": 1}, "weights": torch.ones(3)}, "step-000001")
    last = tmp_path / "last.pt"
    original = last.read_bytes()

    import ssd_core.storage

    def crash(src, dst):
        raise OSError("disk full (simulated during rename)")

    monkeypatch.setattr(ssd_core.storage.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        runtime.save_checkpoint({"state": {"step": 2}, "weights": torch.zeros(1000)}, "step-000002")
    monkeypatch.undo()

    assert last.read_bytes() == original
    assert read_checkpoint(str(last))["state"]["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind

    def broken_save(*args, **kwargs):
        raise RuntimeError("interrupted while serialising")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="serialising"):
        runtime.save_checkpoint({"state": {"step": 3}}, "step-000003")
    assert last.read_bytes() == original


# -- exact resume -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_mid_epoch_ends_with_the_uninterrupted_weights(tiny_data, tmp_path):
    """Stop in the middle of epoch 2 (with loader worker processes and random augmentation), resume,
    and finish: weights, optimizer state and the loss log equal the uninterrupted run's."""
    common = dict(workers=2, epochs=2, checkpoint_every=4)
    straight = fit(tiny_config(tiny_data, tmp_path / "straight", **common))
    stopped = fit(tiny_config(tiny_data, tmp_path / "resumed", max_steps=8, **common))
    assert stopped["stop_reason"] == "max_steps" and stopped["step"] == 8
    assert read_checkpoint(str(tmp_path / "resumed" / "last.pt"))["state"]["batch_in_epoch"] == 2
    resumed = fit(tiny_config(tiny_data, tmp_path / "resumed", resume=True, **common))
    assert resumed["step"] == straight["step"] == 12 and resumed["stop_reason"] == "completed"

    a = read_checkpoint(str(tmp_path / "straight" / "last.pt"))
    b = read_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for index, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 12

    def train_losses(run: str) -> list[tuple[int, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]

    straight_log, resumed_log = train_losses("straight"), train_losses("resumed")
    assert [s for s, _ in resumed_log] == [s for s, _ in straight_log]  # no duplicated steps after resume
    assert [loss for _, loss in resumed_log] == pytest.approx([loss for _, loss in straight_log], rel=1e-4)
    assert resumed["AP50"] == pytest.approx(straight["AP50"], abs=1e-6)


# -- the run folder -----------------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    fit(tiny_config(tiny_data, run_dir, max_steps=2, log_every=1))
    (run_dir / "notes.txt").write_text("kept")
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "config.json")}

    code = main(["train", "--arch", ARCH, "--data", str(tiny_data), "--output", str(run_dir), "--epochs", "2",
                 "--batch-size", "4", "--size", "96", "--precision", "fp32", "--loader-workers", "0",
                 "--max-steps", "3", "--no-progress"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(errors) == 1, errors
    assert "already holds a run (last.pt, metrics.jsonl); pass --resume" in errors[0] and "--overwrite" in errors[0]
    assert {name: (run_dir / name).read_bytes() for name in before} == before  # nothing touched

    def steps_logged() -> list[int]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]

    resumed = fit(tiny_config(tiny_data, run_dir, max_steps=3, log_every=1, resume=True))
    assert resumed["step"] == 3 and steps_logged() == [1, 2, 3]

    fresh = fit(tiny_config(tiny_data, run_dir, max_steps=1, log_every=1, overwrite=True))
    assert fresh["step"] == 1 and steps_logged() == [1]
    assert read_checkpoint(str(run_dir / "last.pt"))["state"]["step"] == 1
    assert (run_dir / "notes.txt").read_text() == "kept"
    with pytest.raises(ValueError, match="exclude each other"):
        fit(tiny_config(tiny_data, run_dir, resume=True, overwrite=True))


# -- real datasets: COCO 2017's layout, unreadable images -----------------------------------------------


def test_explicit_split_locations_replace_the_data_layout(tiny_data, tmp_path):
    from ssd_core.engine import build_datasets

    coco = as_coco2017(tiny_data, tmp_path / "coco")
    config = tiny_config("", tmp_path / "run", train_images=str(coco / "train2017"),
                         train_annotations=str(coco / "annotations" / "instances_train2017.json"),
                         val_images=str(tiny_data / "val"), val_annotations=str(tiny_data / "annotations" / "instances_val.json"))
    train, val = build_datasets(config.resolved(), (96, 96))
    assert (train.image_folder, val.image_folder) == (str(coco / "train2017"), str(tiny_data / "val"))
    assert len(train) == 24 and len(val) == 8 and train[0][0].shape == (3, 96, 96)
    with pytest.raises(ValueError, match="--val-images and --val-annotations go together"):
        tiny_config(tiny_data, tmp_path / "run", val_images=str(tiny_data / "val")).resolved()
    with pytest.raises(ValueError, match="data: a dataset directory .* or --train-images and --train-annotations"):
        tiny_config("", tmp_path / "run").resolved()


@pytest.mark.slow
def test_training_on_coco2017_layout_skips_and_counts_unreadable_images(tiny_data, tmp_path, capsys, caplog):
    coco = as_coco2017(tiny_data, tmp_path / "coco")
    names = [image["file_name"] for image in
             json.loads((coco / "annotations" / "instances_train2017.json").read_text())["images"]]
    truncated, missing = coco / "train2017" / names[3], coco / "train2017" / names[10]
    truncated.write_bytes(truncated.read_bytes()[:300])  # a JPEG cut off inside its header
    missing.unlink()
    val_names = [image["file_name"] for image in
                 json.loads((coco / "annotations" / "instances_val2017.json").read_text())["images"]]
    (coco / "val2017" / val_names[1]).write_bytes(b"not an image")  # evaluation scores the other images
    args = ["train", "--arch", ARCH, "--data", str(coco), "--epochs", "1", "--batch-size", "4", "--size", "96",
            "--precision", "fp32", "--loader-workers", "2", "--eval-max-images", "4", "--no-progress",
            "--weights-backbone", "none"]

    assert main([*args, "--output", str(tmp_path / "run")]) == 0  # loader worker processes, as in real runs

    summary = json.loads(capsys.readouterr().out)
    assert summary["stop_reason"] == "completed" and summary["step"] == 6  # 24 images, batches of 4: all full
    assert summary["skipped_images"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_images"] for r in records if r["kind"] == "train") == 2
    assert [r["kind"] for r in records].count("eval") == 1 and summary["AP"] is not None
    assert any("evaluation skips an unreadable image" in r.getMessage() and val_names[1] in r.getMessage()
               for r in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if "unreadable training image" in r.getMessage()]
    assert len(warnings) == 2 and any(str(truncated) in w for w in warnings)
    assert any(f"{missing}: image file for image id" in w and "not found" in w for w in warnings)

    assert main([*args, "--output", str(tmp_path / "strict"), "--strict"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("ssd train: error:") and (str(truncated) in error or str(missing) in error)
    assert not (tmp_path / "strict" / "last.pt").exists()


# -- it learns ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memorise_data(tmp_path_factory) -> Path:
    """16 training images, and a val split that is the same 16 images: the loop must fit them."""
    root = write_synthetic_dataset(tmp_path_factory.mktemp("memorise") / "data", 16, 0, seed=5, progress=False)
    shutil.copy(root / "annotations" / "instances_train.json", root / "annotations" / "instances_val.json")
    shutil.rmtree(root / "val")
    (root / "val").symlink_to(root / "train")
    return root


@pytest.mark.slow
def test_short_training_lowers_loss_and_raises_ap50_far_above_untrained(memorise_data, tmp_path):
    config = tiny_config(
        memorise_data, tmp_path / "run", epochs=80, batch_size=8, lr=0.1, warmup_iters=5, augment="none",
        precision="auto", model={"size": [128, 128]}, eval_every=0, eval_max_images=None, eval_batch_size=8,
        log_every=5, weight_decay=0.0, threads=1,
    )
    untrained = build_model(ARCH, num_classes=7, class_names=CocoDataset(str(memorise_data), "val").class_names,
                            size=(128, 128))
    from ssd_core.evaluation import evaluate_model

    dataset = CocoDataset(str(memorise_data), "val", transforms=build_preset("none", size=(128, 128)))
    before = evaluate_model(untrained, dataset, batch_size=8, workers=0, progress=False)["AP50"]
    result = fit(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["AP50"] > max(0.5, before + 0.4), (before, result["AP50"])


# -- the command ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_writes_metrics_curves_and_checkpoints(tiny_data, tmp_path, capsys):
    from ssd_core.cli import main

    run_dir = tmp_path / "run"
    code = main([
        "train", "--arch", ARCH, "--data", str(tiny_data), "--epochs", "1", "--batch-size", "4",
        "--output", str(run_dir), "--size", "96", "--precision", "fp32", "--loader-workers", "0",
        "--eval-max-images", "4", "--no-progress", "--weights-backbone", "none",
    ])
    assert code == 0
    for name in ("config.json", "metrics.jsonl", "curves.png", "last.pt", "best.pt"):
        assert (run_dir / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert train and {"epoch", "step", "loss", "bbox_regression", "classification", "lr", "images_per_s"} <= set(train[0])
    assert len(evals) == 1 and {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
                                "ARl"} <= set(evals[0])
    throughput = [r for r in records if r["kind"] == "throughput"]
    assert throughput and throughput[0]["loader_images_per_s"] > 0 and throughput[0]["train_images_per_s"] > 0
    assert json.loads((run_dir / "config.json").read_text())["model"] == {"size": [96, 96]}
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 6 and summary["checkpoint"].endswith("last.pt")
    assert load_model(str(run_dir / "last.pt")).num_classes == 7
