"""Reading a COCO-format dataset from s3:// on a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import socket
import uuid

import pytest
import torch

from ssd_core.data import CocoDataset, build_preset, make_loader

FAKE_KEY, FAKE_SECRET = "dummy-key-id", "dummy-secret"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint, synth_dir):
    """The synthetic dataset uploaded with boto3 (independent of the code under test); returns its URI."""
    import boto3

    bucket = f"data-{uuid.uuid4().hex[:10]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=FAKE_KEY,
        aws_secret_access_key=FAKE_SECRET,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    for path in synth_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"shapes/{path.relative_to(synth_dir).as_posix()}")
    return f"s3://{bucket}/shapes"


def _assert_same_as_local(remote: CocoDataset, local: CocoDataset) -> None:
    assert remote.image_ids == local.image_ids and remote.class_names == local.class_names
    assert remote.annotation_path.startswith("s3://")
    for index in (0, len(local) - 1):
        remote_image, remote_target = remote[index]
        local_image, local_target = local[index]
        assert torch.equal(remote_image, local_image)
        assert torch.equal(remote_target["boxes"], local_target["boxes"])
    assert len(remote.coco.getAnnIds()) == len(local.coco.getAnnIds())


def test_read_with_storage_options_endpoint(s3_endpoint, s3_dataset, synth_dir, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    options = {
        "key": FAKE_KEY,
        "secret": FAKE_SECRET,
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    remote = CocoDataset(s3_dataset, "val", storage_options=options)
    _assert_same_as_local(remote, CocoDataset(synth_dir, "val"))


def test_read_with_aws_endpoint_env_and_worker_processes(s3_endpoint, s3_dataset, synth_dir, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    remote = CocoDataset(s3_dataset, "train", transforms=build_preset("none", size=(64, 64)))
    _assert_same_as_local(
        remote, CocoDataset(synth_dir, "train", transforms=build_preset("none", size=(64, 64)))
    )
    seen = [
        t["image_id"]
        for _, targets in make_loader(remote, 8, shuffle=False, workers=2, seed=0)
        for t in targets
    ]
    assert seen == remote.image_ids


def test_missing_s3_annotation_file_is_named(s3_endpoint, s3_dataset):
    options = {"key": FAKE_KEY, "secret": FAKE_SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}
    with pytest.raises(FileNotFoundError, match=r"s3://.*/shapes: annotation file not found for split 'test' "
                       r"\(neither annotations/instances_test\.json nor annotations/instances_test2017\.json\)"):
        CocoDataset(s3_dataset, "test", storage_options=options)
