"""The commit protocol of bulk detection's tables, read back with plain Parquet readers (pandas,
pyarrow.dataset, DuckDB's read_parquet) that know nothing of the ledger: at every point a run can be
killed, and after the next run's start-up cleanup, they see only committed blocks, each once."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from s3_server import moto_s3, s3_bucket  # noqa: F401

from ssd_core import storage
from ssd_core.bulk import ledger


def block(uris: list[str], boxes_per_image: int, block_id: str):
    """(detections, images) tables of one block in the documented schemas."""
    n = len(uris) * boxes_per_image
    detections = pa.table({
        "image_uri": [u for u in uris for _ in range(boxes_per_image)], "label": pa.array([1] * n, pa.int32()),
        "label_name": ["cat"] * n, "score": pa.array([0.9] * n, pa.float32()),
        **{c: pa.array([float(i) for i in range(n)], pa.float32()) for c in ("x1", "y1", "x2", "y2")},
        "image_width": pa.array([64] * n, pa.int32()), "image_height": pa.array([48] * n, pa.int32()),
        "model": ["m"] * n, "weights_digest": ["w"] * n, "block_id": [block_id] * n,
    }, schema=ledger.detections_schema())
    images = pa.table({
        "image_uri": uris, "size_bytes": pa.array([10] * len(uris), pa.int64()), "etag": ["e"] * len(uris),
        "width": pa.array([64] * len(uris), pa.int32()), "height": pa.array([48] * len(uris), pa.int32()),
        "num_detections": pa.array([boxes_per_image] * len(uris), pa.int32()), "status": ["ok"] * len(uris),
        "error": pa.array([None] * len(uris), pa.string()), "model": ["m"] * len(uris),
        "weights_digest": ["w"] * len(uris), "block_id": [block_id] * len(uris),
        "processed_at": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * len(uris), pa.timestamp("us", tz="UTC")),
    }, schema=ledger.images_schema())
    return detections, images


def plain_readers(output: Path, table: str) -> dict[str, list[tuple[str, str]]]:
    """(run_id, image_uri) rows of OUTPUT/<table> as three engines read the path, sorted."""
    def rows(frame) -> list[tuple[str, str]]:
        return sorted(zip(frame["run_id"].astype(str), frame["image_uri"]))

    path = output / table
    if not path.exists():
        return {"pandas": [], "pyarrow": [], "duckdb": []}
    return {
        "pandas": rows(pd.read_parquet(path)),
        "pyarrow": rows(pads.dataset(path, format="parquet", partitioning="hive").to_table().to_pandas()),
        "duckdb": rows(duckdb.sql(f"SELECT run_id, image_uri FROM read_parquet('{path}/**/*.parquet', "
                                  "hive_partitioning=true)").df()),
    }


class Killed(Exception):
    pass


def commit_killed_after(moves: int, monkeypatch, *args) -> None:
    """commit_block, killed after ``moves`` successful moves into the tables (0: only staged)."""
    real_move, done = storage.atomic_move, []

    def move(*move_args, **kwargs):
        if len(done) == moves:
            raise Killed
        done.append(move_args)
        real_move(*move_args, **kwargs)

    monkeypatch.setattr(storage, "atomic_move", move)
    with pytest.raises(Killed):
        ledger.commit_block(*args)
    monkeypatch.setattr(storage, "atomic_move", real_move)


def test_plain_readers_see_only_committed_blocks_after_any_kill(tmp_path, monkeypatch):
    output = tmp_path / "out"
    committed = [f"s3://b/a{i}.jpg" for i in range(3)]
    ledger.commit_block(str(output), "r1", "aaa", *block(committed, 2, "aaa"))
    # Killed with both files staged: nothing reaches the tables.
    commit_killed_after(0, monkeypatch, str(output), "r1", "bbb", *block(["s3://b/b.jpg"], 1, "bbb"))
    expected_images = sorted(("r1", u) for u in committed)
    expected_boxes = sorted(("r1", u) for u in committed for _ in range(2))
    for reader, rows in plain_readers(output, "detections").items():
        assert rows == expected_boxes, reader
    for reader, rows in plain_readers(output, "images").items():
        assert rows == expected_images, reader
    assert list((output / ledger.STAGING).rglob("*.parquet"))  # the staged pair is still there
    # Killed between the two moves: detections without their images file until the next run starts.
    commit_killed_after(1, monkeypatch, str(output), "r2", "ccc", *block(["s3://b/c.jpg"], 3, "ccc"))
    assert ("r2", "s3://b/c.jpg") in plain_readers(output, "detections")["duckdb"]
    assert ledger.remove_uncommitted(str(output)) == 1  # what the next run does first
    assert not (output / ledger.STAGING).exists()
    for table, expected in (("detections", expected_boxes), ("images", expected_images)):
        for reader, rows in plain_readers(output, table).items():
            assert rows == expected, (table, reader)
    # A retried block (same content, same id) replaces its files: no second copy of any row.
    ledger.commit_block(str(output), "r1", "aaa", *block(committed, 2, "aaa"))
    assert plain_readers(output, "detections")["pandas"] == expected_boxes
    assert plain_readers(output, "images")["duckdb"] == expected_images
    assert len(list(output.rglob("*.parquet"))) == 2


def test_commit_on_s3_moves_staged_files_into_the_tables(moto_s3, s3_bucket):  # noqa: F811
    import boto3

    output = f"s3://{s3_bucket}/out"
    ledger.commit_block(output, "r1", "aaa", *block(["s3://b/a.jpg"], 2, "aaa"))
    client = boto3.client("s3", endpoint_url=moto_s3)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"])
    assert keys == ["out/detections/run_id=r1/block-aaa.parquet", "out/images/run_id=r1/block-aaa.parquet"]
    assert ledger.read_ledger(output)["image_uri"].to_pylist() == ["s3://b/a.jpg"]
