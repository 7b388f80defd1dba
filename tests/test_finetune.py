"""Training from pretrained weights: an ImageNet-style backbone file, resume of such a run, and
fine-tuning a detector to other classes (classification head re-initialised, everything else kept)
against training from scratch for the same number of steps."""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from ssd_core import load_model
from ssd_core.data import write_synthetic_dataset
from ssd_core.engine import fit
from ssd_core.train_config import TrainConfig

ARCH = "ssdlite320_mobilenet_v3_large"


def _config(data: Path, output: Path, **changes) -> TrainConfig:
    values = dict(
        arch=ARCH, data=str(data), output=str(output), epochs=1, batch_size=4, lr=0.05, warmup_iters=2,
        precision="fp32", workers=0, seed=7, augment="none", model={"size": [96, 96]}, eval_every=0,
        eval_max_images=4, eval_batch_size=4, log_every=1, loader_probe_batches=0, progress=False, threads=1,
        weights_backbone=None,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "data", 16, 4, seed=3, progress=False)


def test_pretrained_backbone_run_resumes_and_reloads(tiny_data, tmp_path):
    """A run from an ImageNet MobileNetV3 file (full tail, unlike a from-scratch run's reduced one)
    with a frozen backbone keeps the file's convolutions, resumes, and its checkpoint rebuilds alone."""
    torch.manual_seed(0)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    classifier = torchvision.models.mobilenet_v3_large(norm_layer=norm)
    backbone_file = tmp_path / "mobilenet_v3_large-imagenet.pth"
    torch.save(classifier.state_dict(), backbone_file)

    run = tmp_path / "run"
    config = _config(tiny_data, run, epochs=2, weights_backbone=str(backbone_file), trainable_backbone_layers=0)
    stopped = fit(TrainConfig(**{**config.__dict__, "max_steps": 3}))
    assert stopped["step"] == 3
    first = torch.load(run / "last.pt", weights_only=True)
    # The full tail the file needs: 960-channel convolutions (the reduced tail stops at 672).
    widest = max(v.shape[0] for k, v in first["model"].items() if k.startswith("backbone.features.") and v.dim() == 4)
    assert widest == classifier.features[16][0].out_channels == 960
    assert first["model_config"]["reduced_tail"] is False
    assert torch.equal(first["model"]["backbone.features.0.0.0.weight"], classifier.features[0][0].weight)
    resumed = fit(TrainConfig(**{**config.__dict__, "resume": True}))
    assert resumed["step"] == 8 and resumed["epoch"] == 2
    model = load_model(str(run / "last.pt"))
    assert model.num_classes == 7 and model.class_names[1] == "circle"


def _labelled_subset(source: Path, target: Path, names: set[str]) -> Path:
    """A copy of a synthetic dataset's train split that labels only the shapes in `names` (others are
    background), with that same split as its val split: the comparison is of how fast each start fits
    the labels, on few images, within a CPU test's budget."""
    shutil.copytree(source, target)
    path = target / "annotations" / "instances_train.json"
    document = json.loads(path.read_text())
    keep = {c["id"] for c in document["categories"] if c["name"] in names}
    document["categories"] = [c for c in document["categories"] if c["id"] in keep]
    document["annotations"] = [a for a in document["annotations"] if a["category_id"] in keep]
    path.write_text(json.dumps(document))
    shutil.copy(path, target / "annotations" / "instances_val.json")
    shutil.rmtree(target / "val")
    (target / "val").symlink_to(target / "train")
    return target


@pytest.mark.slow
def test_fine_tuning_beats_scratch_after_the_same_steps(tmp_path, caplog):
    """Pretrain briefly on circles/squares/triangles, then fine-tune on other images labelled with
    stars and rings: after K steps the fine-tuned AP50 is clearly above from scratch's. Each start takes
    its usual learning rate (fine-tuning a lower one); on 16 images the AP50 after 40 steps varies with the
    seed (fine-tuned 0.16-0.24, from scratch 0.003-0.085 over four seeds), hence a ratio and a margin."""
    pretrain_data = _labelled_subset(write_synthetic_dataset(tmp_path / "a", 16, 0, seed=11, progress=False),
                                     tmp_path / "pretrain", {"circle", "square", "triangle"})
    fine_data = _labelled_subset(write_synthetic_dataset(tmp_path / "b", 16, 0, seed=12, progress=False),
                                 tmp_path / "fine", {"star", "ring"})
    common = dict(batch_size=8, lr=0.1, warmup_iters=5, precision="auto", model={"size": [128, 128]},
                  eval_max_images=None, eval_batch_size=8, weight_decay=0.0, log_every=5)
    pretrained = fit(_config(pretrain_data, tmp_path / "pretrain-run", epochs=80, **common))  # 160 steps

    k_epochs = 20  # 2 steps per epoch: K = 40 steps
    with caplog.at_level(logging.INFO, logger="ssd_core.zoo"):
        tuned = fit(_config(fine_data, tmp_path / "tuned", epochs=k_epochs, weights=pretrained["checkpoint"],
                            **{**common, "lr": 0.03}))
    heads = [r.getMessage() for r in caplog.records if "classification head re-initialised" in r.getMessage()]
    assert heads == ["classification head re-initialised: 4 -> 3 classes"]
    scratch = fit(_config(fine_data, tmp_path / "scratch", epochs=k_epochs, **common))
    assert tuned["step"] == scratch["step"] == 2 * k_epochs
    print(f"pretrain AP50 {pretrained['AP50']:.3f} after {pretrained['step']} steps; after {tuned['step']} steps: "
          f"fine-tuned AP50 {tuned['AP50']:.3f}, from scratch {scratch['AP50']:.3f}")
    assert load_model(tuned["checkpoint"]).class_names == ["__background__", "star", "ring"]
    assert tuned["AP50"] > max(1.5 * scratch["AP50"], scratch["AP50"] + 0.05), (tuned["AP50"], scratch["AP50"])
