"""Ray Train distributed training (ssd_core.distributed) on a local 2-CPU Ray cluster with 2 workers.

All tests share one Ray cluster (module fixture, started after the moto S3 environment is set so
that Ray's worker processes inherit it) and one 16-image synthetic dataset.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from s3_server import FAKE_SECRET, moto_s3, s3_bucket  # noqa: F401

from ssd_core import engine, sampling
from ssd_core.distributed import fit_distributed
from ssd_core.train_config import TrainConfig

pytestmark = pytest.mark.slow

# SSD300-VGG16 at 128 px with the first two extra blocks only (feature maps 16, 8, 4, 2): no BatchNorm
# anywhere, so a step's gradient is a plain sum over images and DDP can be compared with one process.
SMALL_VGG = {
    "size": [128, 128],
    "extra_spec": [[256, 512, 3, 2, 1], [128, 256, 3, 2, 1]],
    "aspect_ratios": [[2], [2, 3], [2, 3], [2]],
    "scales": [0.1, 0.3, 0.5, 0.7, 0.9],
    "steps": [8, 16, 32, 64],
}
KILL_MARKER = "killed-rank1.pid"
KILL_AT_STEP = 5


@pytest.fixture(scope="module")
def ray_cluster(moto_s3):  # noqa: F811
    """One local Ray cluster for the module (2 CPUs, no dashboard), shut down at the end."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    saved_address = os.environ.pop("RAY_ADDRESS", None)  # never join a real cluster from tests
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()
    if saved_address is not None:
        os.environ["RAY_ADDRESS"] = saved_address


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> str:
    from ssd_core.data import write_synthetic_dataset

    return str(write_synthetic_dataset(tmp_path_factory.mktemp("synth"), 16, 4, seed=0, progress=False))


def small_config(data: str, output: Path, **overrides) -> TrainConfig:
    """SSDLite at 96 px, 2 images per worker: 4 steps per epoch on 2 workers, fp32, no augmentation."""
    values = dict(
        arch="ssdlite320_mobilenet_v3_large", data=data, output=str(output), epochs=2, batch_size=2,
        precision="fp32", augment="none", workers=0, seed=0, checkpoint_every=2, log_every=1,
        loader_probe_batches=0, eval_batch_size=4, progress=False, model={"size": [96, 96]}, weights_backbone=None,
    )
    values.update(overrides)
    return TrainConfig(**values)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_finished_run(result: dict, run_dir: Path, *, epochs: int, steps: int) -> None:
    """The run ended normally with continuous records and a loadable RUN_DIR/last.pt."""
    from ssd_core import zoo

    assert result["stop_reason"] == "completed"
    assert (result["epoch"], result["step"]) == (epochs, steps)
    # Every step logged exactly once across the interruption: nothing lost, nothing repeated.
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, steps + 1))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == list(range(epochs))
    payload = torch.load(run_dir / "last.pt", weights_only=True)
    assert (payload["state"]["epoch"], payload["state"]["step"]) == (epochs, steps)
    assert zoo.load_model(str(run_dir / "last.pt")).arch == payload["arch"]


# -- 1. one DDP step equals one process --------------------------------------------------------------


def test_one_ddp_step_matches_one_process_on_the_same_samples(ray_cluster, synth_data, tmp_path):
    """Two workers with b images each take the step one process takes on the same 2b images.

    What "the same step" means for SSD: the multibox loss of a batch is normalised by that batch's
    number of matched default boxes N. DDP averages the workers' gradients, so the distributed step
    descends 1/2 (L_0 / N_0 + L_1 / N_1), with L_r the summed loss of worker r's shard. A single process
    on all 2b images would descend (L_0 + L_1) / (N_0 + N_1), which is the same only when N_0 = N_1.
    So the reference here is one process on the 2b images whose loss is the mean of the two shards'
    normalised losses, computed shard by shard from the same initial weights; with a model without
    BatchNorm (VGG16 SSD) nothing else couples the images of a batch, so this is exactly DDP's
    objective and the weights must agree to float rounding. The shards are the engine's per-rank
    batches (`EpochSampler`, rank::world_size like DistributedSampler). As a control, the step on one
    shard alone must land visibly elsewhere (so the test would notice a worker's gradient being lost).
    """
    per_worker = 2
    config = TrainConfig(
        arch="ssd300_vgg16", data=synth_data, output=str(tmp_path / "run"), epochs=1, batch_size=per_worker,
        lr=0.01, momentum=0.9, weight_decay=5e-4, warmup_iters=0, grad_clip=None, precision="fp32",
        augment="none", workers=0, seed=3, max_steps=1, loader_probe_batches=0, progress=False, model=SMALL_VGG,
        weights_backbone=None,
    )
    result = fit_distributed(config, num_workers=2)
    assert result["world_size"] == 2 and result["step"] == 1
    distributed_weights = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]

    # The reference, built the way `engine.fit` builds its model (seed, datasets, then the model).
    resolved = config.resolved(world_size=2)
    torch.manual_seed(resolved.seed)
    train_set, _ = engine.build_datasets(resolved, tuple(SMALL_VGG["size"]))
    model = engine.build_model_for(resolved, train_set.class_names, None)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    shards = []
    for rank in range(2):
        loader = sampling.make_train_loader(train_set, per_worker, workers=0, seed=resolved.seed, rank=rank,
                                          world_size=2)
        sampling.epoch_sampler(loader).set_epoch(0)
        shards.append(next(iter(loader)))
    ids = [t["image_id"] for _, targets in shards for t in targets]
    assert len(set(ids)) == 2 * per_worker  # the two workers saw different images

    def step_on(shard_losses) -> dict[str, torch.Tensor]:
        model.load_state_dict(initial)
        model.train()
        optimizer = torch.optim.SGD(engine.parameter_groups(model, resolved.weight_decay), lr=resolved.lr,
                                    momentum=resolved.momentum)
        optimizer.zero_grad()
        loss = torch.stack([sum(model(images, targets).values()) for images, targets in shard_losses]).mean()
        loss.backward()
        optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    # One intra-op thread like each worker: the same kernels, so agreement is to the last bit in practice.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = step_on(shards)
        one_shard_only = step_on(shards[:1])
    finally:
        torch.set_num_threads(threads)

    largest_update = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert largest_update > 1e-3  # the step is visible
    for key, expected in reference.items():
        torch.testing.assert_close(distributed_weights[key], expected, rtol=1e-5, atol=1e-7,
                                   msg=lambda message, key=key: f"{key}: {message}")
    lost_shard_gap = max((one_shard_only[k] - distributed_weights[k]).abs().max().item() for k in reference)
    assert lost_shard_gap > 1e-4


# -- 2. stop and start again under the same run name ---------------------------------------------------


def test_run_stopped_after_a_checkpoint_resumes_under_the_same_name(ray_cluster, synth_data, tmp_path):
    run_dir = tmp_path / "run"
    first = fit_distributed(small_config(synth_data, run_dir, max_steps=3), num_workers=2)
    assert (first["stop_reason"], first["step"]) == ("max_steps", 3)
    assert first["resumed_from"] is None
    records_before = train_records(run_dir)
    assert [r["step"] for r in records_before] == [1, 2, 3]

    # Started again without --resume, the run folder is refused before any worker starts.
    with pytest.raises(ValueError, match=r"already holds a run \(last\.pt, metrics\.jsonl, .*ray/run\); pass --resume"):
        fit_distributed(small_config(synth_data, run_dir), num_workers=2)
    assert train_records(run_dir) == records_before

    second = fit_distributed(small_config(synth_data, run_dir, resume=True), num_workers=2)

    # Ray handed the new trainer the latest checkpoint of the stopped run (step 3, after step 2's).
    assert second["resumed_from"] is not None
    assert Path(second["resumed_from"]).name.startswith("step-000003")
    assert Path(second["resumed_from"]).parent == run_dir / "ray" / "run"
    assert_finished_run(second, run_dir, epochs=2, steps=8)
    # The stopped run's records are kept as they were (a fresh start would have rewritten them).
    assert train_records(run_dir)[:3] == records_before
    # RUN_DIR/last.pt is the final Ray checkpoint.
    ray_final = torch.load(Path(second["ray_checkpoint"]) / "last.pt", weights_only=True)
    local_final = torch.load(run_dir / "last.pt", weights_only=True)
    for key, value in ray_final["model"].items():
        assert torch.equal(local_final["model"][key], value), key


def test_overwrite_replaces_the_run_and_its_ray_checkpoints(ray_cluster, synth_data, tmp_path):
    import shutil

    from ssd_core.data import CocoDataset

    # A copy of the data where the first image rank 1 reads is corrupt: only rank 1 sees it, and rank 0
    # (which writes metrics.jsonl) must still count it.
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    index = sampling.EpochSampler(16, seed=0, rank=1, world_size=2).order()[0].item()
    corrupt = Path(CocoDataset(str(data), "train").image_path(index))
    corrupt.write_bytes(b"\xff\xd8 cut short")
    synth_data = str(data)
    run_dir = tmp_path / "run"
    fit_distributed(small_config(synth_data, run_dir, max_steps=2), num_workers=2)
    (run_dir / "notes.txt").write_text("kept")
    old_checkpoints = sorted(p.name for p in (run_dir / "ray" / "run").iterdir() if p.name.startswith("step-"))
    assert old_checkpoints

    again = fit_distributed(small_config(synth_data, run_dir, max_steps=1, overwrite=True), num_workers=2)

    # A fresh run: not resumed from Ray's checkpoints of the old one, which are gone, nor from last.pt.
    assert again["resumed_from"] is None and again["step"] == 1
    assert [r["step"] for r in train_records(run_dir)] == [1]
    assert train_records(run_dir)[0]["skipped_images"] == 1 and again["skipped_images"] == 1
    assert not any(p.name in old_checkpoints for p in (run_dir / "ray" / "run").iterdir())
    assert torch.load(run_dir / "last.pt", weights_only=True)["state"]["step"] == 1
    assert (run_dir / "notes.txt").read_text() == "kept"  # only the run's own files are replaced


# -- 3. a worker killed mid-run is replaced ----------------------------------------------------------------


def train_loop_killing_rank1(config_dict: dict) -> dict:
    """`train_loop_per_worker`, except that on the first attempt (no marker file in RUN_DIR yet) rank 1
    SIGKILLs its own process right after its KILL_AT_STEP-th optimizer step."""
    import ray.train

    from ssd_core import distributed

    marker = Path(config_dict["config"]["output"]) / KILL_MARKER
    if ray.train.get_context().get_world_rank() != 1 or marker.exists():
        return distributed.train_loop_per_worker(config_dict)
    real_step = engine.training_step
    calls = itertools.count(1)

    def step_then_die(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        if next(calls) == KILL_AT_STEP:
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return losses

    engine.training_step = step_then_die  # train_one_epoch looks it up at call time
    try:
        return distributed.train_loop_per_worker(config_dict)
    finally:
        engine.training_step = real_step


def test_killed_worker_is_replaced_and_training_finishes(ray_cluster, synth_data, tmp_path):
    import sys

    from ray import cloudpickle

    # Ray's workers cannot import this test module: ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run_dir = tmp_path / "run"
    result = fit_distributed(small_config(synth_data, run_dir), num_workers=2, max_failures=2,
                             train_loop=train_loop_killing_rank1)

    assert (run_dir / KILL_MARKER).exists()  # the worker really was killed
    # The replacement worker group resumed from the last checkpoint before the kill: the end of epoch 1
    # (step 4; checkpoints every 2 steps, the kill after step 5).
    assert result["resumed_from"] is not None
    assert Path(result["resumed_from"]).name.startswith("epoch-0001")
    assert_finished_run(result, run_dir, epochs=2, steps=8)


# -- 4. checkpoints in S3 ------------------------------------------------------------------------------------


def test_checkpoints_go_to_s3_and_a_run_resumes_from_there(ray_cluster, synth_data, s3_bucket, tmp_path):  # noqa: F811
    import boto3

    run_dir = tmp_path / "run"
    storage = f"s3://{s3_bucket}/ray-runs"
    first = fit_distributed(small_config(synth_data, run_dir, max_steps=2), num_workers=2, storage_path=storage,
                            run_name="s3-run")
    assert (first["stop_reason"], first["step"]) == ("max_steps", 2)
    assert first["ray_checkpoint"].startswith(f"{s3_bucket}/ray-runs/s3-run/step-000002")

    second = fit_distributed(small_config(synth_data, run_dir, resume=True), num_workers=2, storage_path=storage,
                             run_name="s3-run")
    assert second["resumed_from"] == first["ray_checkpoint"]
    assert_finished_run(second, run_dir, epochs=2, steps=8)

    # Read the bucket with boto3, independently of pyarrow and Ray.
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="ray-runs/s3-run/")["Contents"]]
    # Both runs reported checkpoints (steps 2 | 4, 6, 8); Ray kept the latest 3 (keep_checkpoints=3).
    kept = sorted(k.split("/")[2].rsplit("_", 1)[0] for k in keys if k.endswith("/last.pt"))
    assert kept == ["epoch-0001", "epoch-0002", "step-000006"]
    final_key = second["ray_checkpoint"].split("/", 1)[1] + "/last.pt"
    body = s3.get_object(Bucket=s3_bucket, Key=final_key)["Body"].read()
    assert body == (run_dir / "last.pt").read_bytes()
    # No credential in what the run wrote or returned.
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert FAKE_SECRET not in path.read_text()
    assert FAKE_SECRET not in json.dumps(second, default=str)
