"""Named weights, offline: a loopback HTTP server stands in for the download hosts, TORCH_HOME is a
temporary folder, and torchvision's own loaders (reading the same pre-seeded cache) are the reference
for "DEFAULT"."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import io
import socket
import threading
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection as tv_detection
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as make_vgg_layers

from ssd_core import build_model
from ssd_core import weights as W
from ssd_core.cli import main as cli_main


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: collections.Counter = collections.Counter()

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests[self.path] += 1
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base URL, files served by path, request counts by path) of a server on 127.0.0.1."""
    handler = type("Handler", (_Handler,), {"files": {}, "requests": collections.Counter()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.files, handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(W.MIRROR_ENV, raising=False)
    return home


def _checkpoints(home):
    return home / "hub" / "checkpoints"


def _serialize(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _hashed_name(stem: str, data: bytes) -> str:
    """torch.hub's convention: the first hex digits of the file's SHA-256 after the last '-'."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def _spread_init(model: nn.Module) -> nn.Module:
    """He init for every convolution: SSDLite's N(0, 0.03) makes every random score 1/91 and ties
    would make the detection order arbitrary (the checks are on equivalence, not accuracy)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in")
    return model


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 200, generator=g)]


def _assert_same_detections(expected, got):
    for e, o in zip(expected, got):
        assert e["boxes"].shape[0] > 0
        assert e["boxes"].shape == o["boxes"].shape
        torch.testing.assert_close(o["scores"], e["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-4, rtol=1e-5)
        assert torch.equal(o["labels"], e["labels"])


# -- the registry --------------------------------------------------------------------------------


def test_registry_reuses_torchvision_enums():
    entry = W.get_weights("DEFAULT", "ssd300_vgg16")
    assert entry.enum is tv_detection.SSD300_VGG16_Weights.COCO_V1
    assert entry.url == tv_detection.SSD300_VGG16_Weights.COCO_V1.url
    assert list(entry.categories) == tv_detection.SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    assert entry.coco_ap == tv_detection.SSD300_VGG16_Weights.COCO_V1.meta["_metrics"]["COCO-val2017"]["box_map"]
    # The recipe's backbone, not VGG16's classification DEFAULT.
    assert W.get_weights("DEFAULT", "ssd300_vgg16", backbone=True).enum is (
        torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES)
    assert W.get_weights("IMAGENET1K_V2", "ssd300_resnet50", backbone=True).enum is (
        torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    # Every spelling of the same file: enum member, torchvision's name, our full name.
    member = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V2
    for spec in (member, "MobileNet_V2_Weights.IMAGENET1K_V2", "mobilenet_v2.IMAGENET1K_V2", "IMAGENET1K_V2"):
        assert W.get_weights(spec, "ssdlite300_mobilenet_v2", backbone=True).enum is member
    nvidia = W.get_weights("COCO_V1", "ssd300_resnet50")
    assert nvidia.file_name == "nvidia_ssdpyt_amp_200703.pt" and len(nvidia.categories) == 81
    assert W.get_weights("some/dir/model.pt", "ssd300_vgg16") is None  # a path, not a name


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="no published COCO weights"):
        W.get_weights("DEFAULT", "ssd512_vgg16")
    with pytest.raises(ValueError, match="choose one of DEFAULT, COCO_V1"):
        W.get_weights("COCO_V9", "ssd300_vgg16")
    with pytest.raises(ValueError, match="are for ssd300_vgg16, not ssdlite320_mobilenet_v3_large"):
        W.get_weights(tv_detection.SSD300_VGG16_Weights.COCO_V1, "ssdlite320_mobilenet_v3_large")
    with pytest.raises(ValueError, match="are for resnet50, not ssd300_vgg16's backbone"):
        W.get_weights("resnet50.IMAGENET1K_V1", "ssd300_vgg16", backbone=True)


# -- downloads ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssdlite_state():
    torch.manual_seed(0)
    model = tv_detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    return _spread_init(model).state_dict()


def test_url_download_hash_check_cache_reuse(server, torch_home, ssdlite_state):
    base, files, requests = server
    data = _serialize(ssdlite_state)
    name = _hashed_name("ssdlite320_mobilenet_v3_large_coco", data)
    files[f"/models/{name}"] = data
    url = f"{base}/models/{name}"

    model = build_model("ssdlite320_mobilenet_v3_large", weights=url, progress=False)
    cached = _checkpoints(torch_home) / name
    assert cached.read_bytes() == data  # TORCH_HOME honoured, torch.hub's file name
    assert requests[f"/models/{name}"] == 1
    assert W.weights_file(url) == str(cached)
    again = build_model("ssdlite320_mobilenet_v3_large", weights=url, progress=False)
    assert requests[f"/models/{name}"] == 1  # the cache answered
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
        if key in ssdlite_state:
            assert torch.equal(value, ssdlite_state[key])


def test_registry_entry_download_and_mirror(server, torch_home, ssdlite_state, tmp_path, monkeypatch):
    base, files, requests = server
    data = _serialize(ssdlite_state)
    name = _hashed_name("ssdlite320_mobilenet_v3_large_coco", data)
    files[f"/{name}"] = data
    entry = dataclasses.replace(W.get_weights("COCO_V1", "ssdlite320_mobilenet_v3_large"), url=f"{base}/{name}")

    mirror = tmp_path / "mirror"
    written = W.copy_to(entry, str(mirror), progress=False)
    assert requests[f"/{name}"] == 1 and (mirror / name).read_bytes() == data and written == str(mirror / name)

    # A second machine: empty cache, no server, the mirror in the environment.
    other_home = tmp_path / "other-home"
    monkeypatch.setenv("TORCH_HOME", str(other_home))
    monkeypatch.setenv(W.MIRROR_ENV, str(mirror))
    files.clear()
    path, found = W.resolve(entry, "ssdlite320_mobilenet_v3_large", progress=False)
    assert path == str(_checkpoints(other_home) / name) and found is entry
    assert (_checkpoints(other_home) / name).read_bytes() == data
    # The mirror's file is also a plain path for --weights.
    model = build_model("ssdlite320_mobilenet_v3_large", weights=written)
    assert model.class_names[1] == "person" and model.num_classes == 91


def test_corrupted_download_is_refused(server, torch_home, ssdlite_state):
    base, files, _ = server
    data = _serialize(ssdlite_state)
    name = _hashed_name("ssdlite320_mobilenet_v3_large_coco", data)
    files[f"/{name}"] = data[:-100] + b"x" * 100  # same name, different bytes
    with pytest.raises(W.WeightsUnavailable, match="failed its hash check") as info:
        build_model("ssdlite320_mobilenet_v3_large", weights=f"{base}/{name}", progress=False)
    assert "\n" not in str(info.value)
    assert not (_checkpoints(torch_home) / name).exists()  # nothing half-written is left to be reused


def test_corrupted_cached_file_names_the_file(torch_home):
    entry = W.get_weights("DEFAULT", "ssdlite320_mobilenet_v3_large")
    path = _checkpoints(torch_home) / entry.file_name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=f"weights file {path} cannot be read.*delete it"):
        build_model("ssdlite320_mobilenet_v3_large", weights="DEFAULT")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_one_line_with_url_and_cache_path(torch_home, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/models/ssd300_vgg16_coco-b556d3b4.pth"
    expected = _checkpoints(torch_home) / "ssd300_vgg16_coco-b556d3b4.pth"
    with pytest.raises(W.WeightsUnavailable) as info:
        W.weights_file(url, progress=False)
    message = str(info.value)
    assert "\n" not in message and url in message and f"put that file at {expected}" in message
    # The CLI prints it as one line and exits non-zero.
    assert cli_main(["weights", "download", url, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url in err[0] and str(expected) in err[0] and "Traceback" not in err[0]


# -- "DEFAULT" against torchvision reading the same cache ----------------------------------------


@pytest.mark.parametrize("arch", ["ssd300_vgg16", "ssdlite320_mobilenet_v3_large"])
def test_default_matches_torchvision(arch, torch_home):
    builder = getattr(tv_detection, arch)
    torch.manual_seed(0)
    generated = builder(weights=None, weights_backbone=None)
    if arch.startswith("ssdlite"):
        _spread_init(generated)
    entry = W.get_weights("DEFAULT", arch)
    seeded = _checkpoints(torch_home) / entry.file_name  # the name torchvision's enum URL uses
    seeded.parent.mkdir(parents=True)
    torch.save(generated.state_dict(), seeded)

    reference = builder(weights="DEFAULT").eval()  # torchvision reads the cache (no network here)
    ours = build_model(arch, weights="DEFAULT").eval()
    assert ours.class_names == entry.enum.meta["categories"]
    images = _images()
    with torch.no_grad():
        _assert_same_detections(reference(images), ours(images))


def test_backbone_default_matches_torchvision(torch_home):
    torch.manual_seed(0)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    classifier = torchvision.models.mobilenet_v3_large(norm_layer=norm)
    for module in classifier.modules():  # non-trivial statistics so the comparison means something
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_mean, -0.1, 0.1)
    entry = W.get_weights("DEFAULT", "ssdlite320_mobilenet_v3_large", backbone=True)
    seeded = _checkpoints(torch_home) / entry.file_name
    seeded.parent.mkdir(parents=True)
    torch.save(classifier.state_dict(), seeded)

    # The recipe's backbone (torchvision's detection reference trains SSDLite from IMAGENET1K_V1; the
    # classifier enum's own DEFAULT is V2).
    assert entry.enum is torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1
    reference = tv_detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=entry.enum).state_dict()
    ours = build_model("ssdlite320_mobilenet_v3_large", weights_backbone="DEFAULT").state_dict()
    features = [k for k in reference if k.startswith("backbone.features.")]
    assert len(features) > 100
    for key in features:
        assert torch.equal(ours[key], reference[key]), key


def test_vgg_backbone_default_is_the_features_file(torch_home):
    torch.manual_seed(0)
    features = make_vgg_layers(vgg_cfgs["D"], batch_norm=False)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    entry = W.get_weights("DEFAULT", "ssd300_vgg16", backbone=True)
    assert entry.file_name == torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES.url.rsplit("/", 1)[1]
    seeded = _checkpoints(torch_home) / entry.file_name
    seeded.parent.mkdir(parents=True)
    torch.save(state, seeded)
    model = build_model("ssd300_vgg16", weights_backbone="DEFAULT")
    ours = model.state_dict()
    assert torch.equal(ours["backbone.features.0.weight"], state["features.0.weight"])
    assert torch.equal(ours["backbone.features.21.weight"], state["features.21.weight"])  # conv4_3
    # A pretrained VGG keeps its first stages frozen (torchvision's default of 4 trainable layers).
    assert not model.backbone.features[0].weight.requires_grad


# -- NVIDIA's published checkpoint -----------------------------------------------------------------


def _nvidia_published_checkpoint(state: dict[str, torch.Tensor]) -> bytes:
    """What DeepLearningExamples' main.py saves (and the hub entry downloads): the model next to the
    optimizer and MultiStepLR states (a collections.Counter inside) and the label map."""
    params = [torch.nn.Parameter(v.float().clone()) for v in list(state.values())[:4]]
    optimizer = torch.optim.SGD(params, lr=2.6e-3, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[43, 54], gamma=0.1)
    categories = [n for n in torchvision.models.detection.SSD300_VGG16_Weights.COCO_V1.meta["categories"][1:]
                  if n != "N/A"]
    label_map = {0: "background", **{i + 1: name for i, name in enumerate(categories)}}
    return _serialize({"epoch": 65, "iteration": 118000, "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "label_map": label_map,
                       "model": {f"module.{k}": v for k, v in state.items()}})


def test_nvidia_published_format_downloads_and_loads(server, torch_home):
    from test_models import NvidiaSSD300

    base, files, requests = server
    torch.manual_seed(0)
    reference = NvidiaSSD300()
    data = _nvidia_published_checkpoint(reference.state_dict())
    entry = W.get_weights("COCO_V1", "ssd300_resnet50")
    files[f"/files/{entry.file_name}"] = data
    served = dataclasses.replace(entry, url=f"{base}/files/{entry.file_name}")

    model = build_model("ssd300_resnet50", weights=served, progress=False).eval()
    assert requests[f"/files/{entry.file_name}"] == 1
    assert (_checkpoints(torch_home) / "nvidia_ssdpyt_amp_200703.pt").read_bytes() == data
    assert model.num_classes == 81 and model.class_names[:3] == ["__background__", "person", "bicycle"]
    assert model.class_names == list(entry.categories)
    # Same weights as loading the bare state_dict (whose import test_models checks against NVIDIA's layout).
    plain = build_model("ssd300_resnet50", weights=str(_checkpoints(torch_home) / entry.file_name))
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])
    assert torch.equal(model.state_dict()["backbone.features.0.weight"],
                       reference.state_dict()["feature_extractor.feature_extractor.0.weight"])


# -- the command -----------------------------------------------------------------------------------


def test_cli_list_and_download_to_a_mirror(torch_home, tmp_path, capsys, ssdlite_state):
    entry = W.get_weights("DEFAULT", "ssdlite320_mobilenet_v3_large")
    seeded = _checkpoints(torch_home) / entry.file_name  # as if fetched before (no network here)
    seeded.parent.mkdir(parents=True)
    torch.save(ssdlite_state, seeded)

    assert cli_main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line.startswith("(")}
    assert set(rows) >= {e.full_name for e in W.REGISTRY}
    assert rows[entry.full_name].rstrip().endswith("yes") and "21.3" in rows[entry.full_name]
    assert rows["ssd300_vgg16.COCO_V1"].rstrip().endswith("no") and "25.1" in rows["ssd300_vgg16.COCO_V1"]
    assert "no published COCO weights" in out and str(_checkpoints(torch_home)) in out

    mirror = tmp_path / "mirror"
    assert cli_main(["weights", "download", entry.full_name, "--to", str(mirror), "--no-progress"]) == 0
    assert (mirror / entry.file_name).read_bytes() == seeded.read_bytes()
    # The copy is usable as --weights directly.
    assert build_model("ssdlite320_mobilenet_v3_large", weights=str(mirror / entry.file_name)).num_classes == 91
