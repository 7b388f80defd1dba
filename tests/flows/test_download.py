"""download-coco mechanics against a real HTTP server on 127.0.0.1 (Range support, a dropped connection)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.download import (
    COCO_ARCHIVES,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    coco_layout,
    download_file,
    extract_zip,
)


class FileServer:
    """Serves ``files`` (path -> bytes) with Range support; can drop the first transfer of a path mid-body."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.drop_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                body = server.files.get(self.path)
                server.requests.append((self.path, self.headers.get("Range")))
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                if range_header := self.headers.get("Range"):
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                payload = body[start:]
                if self.path in server.drop_once:
                    server.drop_once.discard(self.path)
                    self.wfile.write(payload[: len(payload) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # mid-body: the client sees fewer bytes than announced
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_zip(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK | 0777
            archive.writestr(info, target)
    return buffer.getvalue()


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


def _coco_server_files(images: dict[str, list[str]]) -> dict[str, bytes]:
    """A miniature COCO mirror: the three official archive paths with tiny contents."""
    annotations = {
        f"annotations/instances_{split}2017.json": json.dumps({"images": names}).encode()
        for split, names in images.items()
    }
    files = {"/annotations/annotations_trainval2017.zip": make_zip(
        {**annotations, "annotations/person_keypoints_val2017.json": b"{}"})}
    for split, names in images.items():
        files[f"/zips/{split}2017.zip"] = make_zip({f"{split}2017/{name}": name.encode() for name in names})
    return files


def test_flow_downloads_resumes_and_is_idempotent(tmp_path, prefect_harness, monkeypatch):
    from flows import download

    # The production backoff starts at seconds; the retry itself is what is under test.
    monkeypatch.setattr(download, "fetch_archive", download.fetch_archive.with_options(retry_delay_seconds=0))

    images = {"train": ["1.jpg", "2.jpg"], "val": ["3.jpg"]}
    with FileServer(_coco_server_files(images)) as server:
        server.drop_once.add("/zips/train2017.zip")  # the task's retry resumes it
        out = tmp_path / "coco"
        download.download_coco(output=str(out), base_url=server.url)
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
        download.download_coco(output=str(out), base_url=server.url)
        assert len(server.requests) == fetched  # idempotent: nothing fetched again


def test_flow_uploads_the_layout_to_s3(tmp_path, prefect_harness, s3_bucket):
    import boto3

    from flows.download import download_coco

    with FileServer(_coco_server_files({"val": ["3.jpg", "4.jpg"]})) as server:
        output = f"s3://{s3_bucket}/coco"
        download_coco(output=output, splits=["val"], base_url=server.url, staging_dir=str(tmp_path / "staging"))
        requests_after_first_run = len(server.requests)
        download_coco(output=output, splits=["val"], base_url=server.url, staging_dir=str(tmp_path / "staging"))
        assert len(server.requests) == requests_after_first_run

    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="coco/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    assert keys == [
        "coco/_download/annotations_trainval2017.zip.json", "coco/_download/val2017.zip.json",
        "coco/annotations/instances_val.json", "coco/val/3.jpg", "coco/val/4.jpg",
    ]
    # Staging holds nothing once uploaded (no archives, no extracted copies).
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]
