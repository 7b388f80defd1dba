"""ssd_core.storage against local folders and a real moto S3 server (read back with boto3/pyarrow)."""

from __future__ import annotations

import os
import threading

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import moto_s3, s3_bucket  # noqa: F401

from ssd_core import storage


def test_endpoint_from_env_prefers_service_specific(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage.s3_endpoint_from_env() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert storage.s3_endpoint_from_env() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert storage.s3_endpoint_from_env() == "http://s3-only:2"


def test_join_uri():
    assert storage.join_uri("s3://b/p/", "images", "/x.parquet") == "s3://b/p/images/x.parquet"
    assert storage.join_uri("/tmp/out", "a", "", "b") == "/tmp/out/a/b"


def test_local_path_is_local_files_only(tmp_path):
    assert storage.local_path(str(tmp_path / "w.pt")) == str(tmp_path / "w.pt")
    assert storage.local_path(f"file://{tmp_path}/w.pt") == str(tmp_path / "w.pt")
    assert storage.local_path("rel/w.pt") == os.path.join(os.getcwd(), "rel", "w.pt")
    assert storage.local_path("s3://b/w.pt") is None and storage.local_path("https://h/w.pt") is None


def test_local_torch_files_are_read_and_errors_name_them(tmp_path):
    import torch

    from ssd_core.checkpoint import read_torch_file

    torch.save({"step": 3}, tmp_path / "w.pt")
    assert read_torch_file(str(tmp_path / "w.pt"))["step"] == read_torch_file(f"file://{tmp_path}/w.pt")["step"] == 3
    with pytest.raises(FileNotFoundError, match="weights file not found: .*none.pt"):
        read_torch_file(str(tmp_path / "none.pt"), what="weights file")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="checkpoint .*broken.pt cannot be read"):
        read_torch_file(str(tmp_path / "broken.pt"))


def test_atomic_write_local_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "deep" / "dir" / "ckpt.pt"
    storage.atomic_write_bytes(target, b"first")
    storage.atomic_write_bytes(str(target), b"second version")
    assert target.read_bytes() == b"second version"
    assert sorted(os.listdir(target.parent)) == ["ckpt.pt"]
    assert storage.exists(target) and not storage.exists(tmp_path / "missing")


def test_atomic_write_local_readers_never_see_partial_files(tmp_path):
    target = tmp_path / "f.bin"
    big, small = b"a" * 4_000_000, b"b" * 1000
    storage.atomic_write_bytes(target, small)
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(len(target.read_bytes()))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(20):
        storage.atomic_write_bytes(target, big if i % 2 else small)
    stop.set()
    thread.join()
    assert seen <= {len(big), len(small)}


def test_atomic_write_failure_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    storage.atomic_write_bytes(target, b"old")

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        storage.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_open_uri_local_roundtrip(tmp_path):
    uri = f"file://{tmp_path}/sub/x.txt"
    with storage.open_uri(uri, "wb") as handle:
        handle.write(b"hello")
    with storage.open_uri(tmp_path / "sub" / "x.txt") as handle:
        assert handle.read() == b"hello"


def test_s3_roundtrip_uses_env_endpoint(moto_s3, s3_bucket):  # noqa: F811
    uri = f"s3://{s3_bucket}/ckpt/last.pt"
    storage.atomic_write_bytes(uri, b"weights-v1")
    storage.atomic_write_bytes(uri, b"weights-v2")
    # Independent reader: boto3 straight at the endpoint.
    body = boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket=s3_bucket, Key="ckpt/last.pt")["Body"]
    assert body.read() == b"weights-v2"
    with storage.open_uri(uri) as handle:
        assert handle.read() == b"weights-v2"
    assert storage.exists(uri) and storage.exists(f"s3://{s3_bucket}/ckpt")
    assert not storage.exists(f"s3://{s3_bucket}/nope.pt")
    fs, path = storage.filesystem_for(uri)
    assert path == f"{s3_bucket}/ckpt/last.pt"
    assert fs.cat_file(path) == b"weights-v2"


def test_s3_service_specific_endpoint_wins(moto_s3, s3_bucket, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3)
    storage.atomic_write_bytes(f"s3://{s3_bucket}/a.bin", b"x")
    assert storage.exists(f"s3://{s3_bucket}/a.bin")


def test_pyarrow_filesystem_reads_what_s3fs_wrote(moto_s3, s3_bucket):  # noqa: F811
    table = pa.table({"a": [1, 2, 3]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.atomic_write_bytes(f"s3://{s3_bucket}/t/part.parquet", sink.getvalue().to_pybytes())
    fs, path = storage.pyarrow_filesystem_for(f"s3://{s3_bucket}/t")
    assert path == f"{s3_bucket}/t"
    assert pq.read_table(f"{path}/part.parquet", filesystem=fs).equals(table)


def test_pyarrow_local_filesystem(tmp_path):
    fs, path = storage.pyarrow_filesystem_for(str(tmp_path))
    assert path == str(tmp_path)
    assert fs.get_file_info(path).type.name == "Directory"


def test_upload_files_and_read_bytes_local_and_s3(tmp_path, moto_s3, s3_bucket):  # noqa: F811
    source = tmp_path / "src"
    (source / "a").mkdir(parents=True)
    (source / "a" / "x.bin").write_bytes(b"x")
    (source / "y.txt").write_bytes(b"yy")
    names = ["a/x.bin", "y.txt"]
    assert storage.upload_files(source, names, f"s3://{s3_bucket}/up") == 2
    client = boto3.client("s3", endpoint_url=moto_s3)
    assert client.get_object(Bucket=s3_bucket, Key="up/a/x.bin")["Body"].read() == b"x"
    assert storage.read_bytes(f"s3://{s3_bucket}/up/y.txt") == b"yy"
    assert storage.upload_files(source, names, tmp_path / "copy") == 2
    assert (tmp_path / "copy" / "a" / "x.bin").read_bytes() == b"x"
    assert storage.read_bytes(tmp_path / "copy" / "y.txt") == b"yy"
    for missing in (f"s3://{s3_bucket}/up/none", tmp_path / "none"):
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(missing)


def test_torch_files_are_read_from_s3_through_storage(tmp_path, moto_s3, s3_bucket):  # noqa: F811
    """Checkpoints and weights files share one reader: the env endpoint applies, errors name the file."""
    import io

    import torch

    from ssd_core.checkpoint import read_checkpoint, read_torch_file, write_checkpoint

    payload = {"weight": torch.arange(6.0).reshape(2, 3), "step": 3}
    write_checkpoint(f"s3://{s3_bucket}/run/last.pt", payload)
    body = boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket=s3_bucket, Key="run/last.pt")["Body"]
    independent = torch.load(io.BytesIO(body.read()), weights_only=True)  # boto3, not storage
    for loaded in (read_checkpoint(f"s3://{s3_bucket}/run/last.pt"), read_torch_file(f"s3://{s3_bucket}/run/last.pt")):
        assert loaded["step"] == independent["step"] == 3
        assert torch.equal(loaded["weight"], independent["weight"])
    with pytest.raises(FileNotFoundError, match=f"checkpoint not found: s3://{s3_bucket}/run/none.pt"):
        read_checkpoint(f"s3://{s3_bucket}/run/none.pt")
    storage.atomic_write_bytes(f"s3://{s3_bucket}/run/broken.pt", b"not a torch file")
    with pytest.raises(ValueError, match=f"weights file s3://{s3_bucket}/run/broken.pt cannot be read"):
        read_torch_file(f"s3://{s3_bucket}/run/broken.pt", what="weights file")
