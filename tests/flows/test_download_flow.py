"""The `download-coco` flow: Prefect's task retries resume a dropped transfer; output to S3 (moto)."""

from __future__ import annotations

import hashlib
import json

from file_server import FileServer, coco_server_files


def test_flow_downloads_resumes_and_is_idempotent(tmp_path, prefect_harness, monkeypatch):
    from flows import download

    # The production backoff starts at seconds; the retry itself is what is under test.
    monkeypatch.setattr(download, "fetch_archive", download.fetch_archive.with_options(retry_delay_seconds=0))

    images = {"train": ["1.jpg", "2.jpg"], "val": ["3.jpg"]}
    with FileServer(coco_server_files(images)) as server:
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

    with FileServer(coco_server_files({"val": ["3.jpg", "4.jpg"]})) as server:
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
