"""download-coco mechanics against a real HTTP server on 127.0.0.1 (Range support, a dropped connection)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from file_server import FileServer, coco_server_files, make_zip

from ssd_core.data.download import (
    COCO_ARCHIVES,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    coco_layout,
    download_coco,
    download_file,
    extract_zip,
    fetch_archive,
    retrying,
)


@pytest.fixture
def payload() -> bytes:
    # Incompressible and a few MiB, so the body spans several 1 MiB reads.
    return hashlib.shake_256(b"ssd").digest(3 * 1024 * 1024 + 123)


@pytest.fixture
def server(payload) -> Iterator[FileServer]:
    with FileServer({"/blob.bin": payload}) as running:
        yield running


def test_download_verifies_size_and_digests(server, payload, tmp_path):
    record = download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", progress=False,
                           expected_md5=hashlib.md5(payload).hexdigest())
    assert (tmp_path / "blob.bin").read_bytes() == payload
    assert record["size"] == len(payload)
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert not (tmp_path / "blob.bin.part").exists()


def test_interrupted_transfer_resumes_with_a_range_request(server, payload, tmp_path):
    server.drop_once.add("/blob.bin")
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="resumes"):
        download_file(f"{server.url}/blob.bin", dest, progress=False)
    partial = (tmp_path / "blob.bin.part").stat().st_size
    assert 0 < partial < len(payload)
    assert not dest.exists()

    record = download_file(f"{server.url}/blob.bin", dest, progress=False)
    assert server.requests[-1] == ("/blob.bin", f"bytes={partial}-")
    assert dest.read_bytes() == payload
    # The digest covers the resumed prefix too, not just the bytes of the second request.
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()


def test_wrong_md5_removes_the_partial_file(server, tmp_path):
    with pytest.raises(ChecksumError, match="MD5"):
        download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", expected_md5="0" * 32, progress=False)
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_size_announced_by_the_server_must_match_the_expected_size(server, payload, tmp_path):
    with pytest.raises(ChecksumError, match="expected"):
        download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", expected_size=len(payload) + 1,
                      progress=False)


def test_missing_file_is_a_download_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{server.url}/nope.zip", tmp_path / "nope.zip", progress=False)


def test_complete_part_file_is_finished_without_refetching(server, payload, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(payload)
    record = download_file(f"{server.url}/blob.bin", tmp_path / "blob.bin", expected_size=len(payload),
                           progress=False)
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert (tmp_path / "blob.bin").read_bytes() == payload


@pytest.mark.parametrize("entry", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt", "C:/evil.txt"])
def test_zip_slip_entries_reject_the_whole_archive(tmp_path, entry):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip({"good/first.txt": b"fine", entry: b"pwned"}))
    target = tmp_path / "target"
    with pytest.raises(UnsafeArchiveError):
        extract_zip(archive, target)
    # Nothing was written, inside or outside the target.
    assert not target.exists() or not any(target.rglob("*"))
    assert not (tmp_path / "evil.txt").exists() and not Path("/abs/evil.txt").exists()


def test_symlink_entries_are_rejected(tmp_path):
    archive = tmp_path / "link.zip"
    archive.write_bytes(make_zip({"a.txt": b"x"}, symlinks={"link": "/etc/passwd"}))
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_zip(archive, tmp_path / "target")


def test_coco_names_map_to_the_project_layout(tmp_path):
    archive = tmp_path / "coco.zip"
    archive.write_bytes(make_zip({
        "train2017/000000000009.jpg": b"jpg",
        "annotations/instances_val2017.json": b"{}",
        "annotations/captions_val2017.json": b"{}",
    }))
    written = extract_zip(archive, tmp_path / "out", rename=coco_layout)
    assert sorted(written) == ["annotations/instances_val.json", "train/000000000009.jpg"]
    assert (tmp_path / "out/train/000000000009.jpg").read_bytes() == b"jpg"
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_official_archives_carry_known_sizes_and_md5s():
    assert COCO_ARCHIVES["val"].size == 815_585_330
    assert all(len(archive.md5) == 32 for archive in COCO_ARCHIVES.values())


# --------------------------------------------------------------------------- the flow


def test_download_coco_resumes_retries_and_is_idempotent(tmp_path):
    images = {"train": ["1.jpg", "2.jpg"], "val": ["3.jpg"]}
    with FileServer(coco_server_files(images)) as server:
        server.drop_once.add("/zips/train2017.zip")  # the retry resumes it
        out = tmp_path / "coco"
        download_coco(str(out), base_url=server.url, fetch=retrying(fetch_archive, first_delay_s=0))
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                      and not p.relative_to(out).as_posix().startswith("_download/")) == [
            "annotations/instances_train.json", "annotations/instances_val.json",
            "train/1.jpg", "train/2.jpg", "val/3.jpg"]
        assert json.loads((out / "annotations/instances_val.json").read_text()) == {"images": ["3.jpg"]}
        marker = json.loads((out / "_download/train2017.zip.json").read_text())
        assert marker["sha256"] == hashlib.sha256(server.files["/zips/train2017.zip"]).hexdigest()
        assert marker["files"] == 2
        ranges = [header for path, header in server.requests if path == "/zips/train2017.zip"]
        assert ranges[0] is None and ranges[1].startswith("bytes=")  # second attempt resumed
        leftovers = [p.name for p in (out / "_download").iterdir() if not p.name.endswith(".zip.json")]
        assert leftovers == []  # archives removed after extraction

        fetched = len(server.requests)
        download_coco(str(out), base_url=server.url)
        assert len(server.requests) == fetched  # idempotent: nothing fetched again


def test_unsafe_archive_is_not_retried(tmp_path):
    calls = []

    def extract(archive_path, target):
        calls.append(archive_path)
        raise UnsafeArchiveError("bad entry")

    with pytest.raises(UnsafeArchiveError):
        retrying(extract, first_delay_s=0)("a.zip", str(tmp_path))
    assert len(calls) == 1


def test_cli_downloads_only_the_asked_split(tmp_path):
    with FileServer(coco_server_files({"val": ["3.jpg"]})) as server:
        out = tmp_path / "coco"
        done = subprocess.run(
            [sys.executable, "-m", "ssd_core.cli", "data", "download", "coco", "--output", str(out),
             "--splits", "val", "--base-url", server.url], capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr
        assert not any(path == "/zips/train2017.zip" for path, _ in server.requests)
    assert (out / "val" / "3.jpg").read_bytes() == b"3.jpg"
    assert (out / "annotations" / "instances_val.json").exists()
