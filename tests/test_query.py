"""ssd_core.query and `ssd query` over bulk outputs written by bulk's own block writer (no Ray needed),
with DuckDB reading the Parquet files directly as the reference; locally and on a moto S3 server."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import boto3
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import moto_s3, s3_bucket  # noqa: F401

from ssd_core.bulk.stages import DetectConfig, write_block
from ssd_core.cli import main as cli_main
from ssd_core.query import query

CLASS_NAMES = ["__background__", "cat", "dog", "car"]


def _results(uris: list[str], seed: int) -> pa.Table:
    """What the inference actors hand the writer: image columns + per-image box lists."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, len(uris))
    counts[-1] = 0
    status = ["ok"] * (len(uris) - 1) + ["error"]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    total = int(offsets[-1])
    xy = rng.uniform(0, 300, (total, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 50, (total, 2))], axis=1).astype(np.float32)
    return pa.table(
        {
            "image_uri": uris,
            "size_bytes": pa.array(rng.integers(100, 10_000, len(uris)), pa.int64()),
            "etag": [f"etag-{u}" for u in uris],
            "width": pa.array([640] * len(uris), pa.int32()),
            "height": pa.array([480] * len(uris), pa.int32()),
            "status": status,
            "error": [""] * (len(uris) - 1) + ["cannot decode image: broken"],
            "det_label": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(1, 4, total).astype(np.int32))),
            "det_score": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.uniform(0.3, 1, total).astype(np.float32))),
            "det_box": pa.ListArray.from_arrays(pa.array(offsets * 4), pa.array(boxes.reshape(-1))),
        }
    )


def write_output(output: str, storage_options=None) -> None:
    """Two runs of two blocks each, plus an uncommitted detections file (a killed run's leftover)."""
    for run_id, seed in (("run-a", 0), ("run-b", 1)):
        config = DetectConfig(
            output_uri=output, run_id=run_id, arch="x", weights=None, model_name="ssdlite_test",
            weights_digest=f"digest-{run_id}", class_names=CLASS_NAMES,
        )
        for block in range(2):
            uris = [f"s3://bucket/{run_id}/{block}/img{i}.jpg" for i in range(6)]
            write_block(_results(uris, seed * 10 + block), config=config)
    leftover = DetectConfig(
        output_uri=output, run_id="run-c", arch="x", weights=None, model_name="ssdlite_test",
        weights_digest="digest-c", class_names=CLASS_NAMES,
    )
    uris = [f"s3://bucket/killed/img{i}.jpg" for i in range(4)]
    table = _results(uris, 99)
    write_block(table, config=leftover)
    # Remove the ledger file of that block: its detections must not be visible.
    from ssd_core import storage

    fs, root = storage.filesystem_for(output, storage_options)
    ledger = [p for p in fs.find(f"{root}/images") if "run_id=run-c" in p]
    assert len(ledger) == 1
    fs.rm(ledger[0])


def duckdb_reference(output: str, sql: str):
    """The same SQL over DuckDB's own Parquet reader, committed blocks only."""
    con = duckdb.connect()
    con.execute(
        f"CREATE VIEW images AS SELECT * EXCLUDE (block_id) FROM read_parquet('{output}/images/*/*.parquet', hive_partitioning=true)"
    )
    con.execute(
        f"CREATE VIEW detections AS SELECT d.* EXCLUDE (block_id) FROM read_parquet('{output}/detections/*/*.parquet', hive_partitioning=true) d "
        f"WHERE EXISTS (SELECT 1 FROM read_parquet('{output}/images/*/*.parquet', hive_partitioning=true) i "
        "WHERE i.run_id = d.run_id AND i.block_id = d.block_id)"
    )
    return con.sql(sql).to_arrow_table()


@pytest.fixture(scope="module")
def local_output(tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("bulk_out"))
    write_output(output)
    return output


QUERIES = [
    "SELECT run_id, label_name, count(*) AS n, round(avg(score), 6) AS s FROM detections GROUP BY ALL ORDER BY ALL",
    "SELECT status, count(*) AS n, sum(num_detections) AS boxes FROM images GROUP BY ALL ORDER BY ALL",
    "SELECT image_uri, x1, y1, x2, y2, image_width FROM detections WHERE score > 0.9 ORDER BY image_uri, x1",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_query_matches_duckdb_reading_the_files(local_output, sql):
    got = query(local_output, sql)
    want = duckdb_reference(local_output, sql)
    assert got.num_rows > 0
    assert got.to_pylist() == want.to_pylist()


def test_views_have_the_documented_columns_and_hide_uncommitted_blocks(local_output):
    images = query(local_output, "SELECT * FROM images")
    detections = query(local_output, "SELECT * FROM detections")
    assert images.column_names[:9] == ["run_id", "image_uri", "size_bytes", "etag", "width", "height",
                                       "num_detections", "status", "error"]
    assert detections.column_names == ["run_id", "image_uri", "label", "label_name", "score", "x1", "y1", "x2", "y2",
                                       "image_width", "image_height", "model", "weights_digest"]
    assert "run-c" not in set(detections["run_id"].to_pylist())
    assert images.num_rows == 24
    # Every committed image's boxes are all there and nothing else.
    per_image = query(local_output, "SELECT i.image_uri, i.num_detections, count(d.label) AS n FROM images i "
                                    "LEFT JOIN detections d USING (run_id, image_uri) GROUP BY ALL")
    assert per_image["num_detections"].to_pylist() == per_image["n"].to_pylist()
    raw = pq.read_table(next(Path(local_output).glob("detections/run_id=run-c/*.parquet")))
    assert raw.num_rows > 0  # the hidden block really had boxes


def test_query_errors_name_the_problem(local_output, tmp_path):
    with pytest.raises(ValueError, match="query failed"):
        query(local_output, "SELECT nope FROM detections")
    with pytest.raises(FileNotFoundError, match="no bulk-detection output"):
        query(str(tmp_path), "SELECT 1")


def test_cli_exports(local_output, tmp_path, capsys):
    sql = QUERIES[1]
    want = duckdb_reference(local_output, sql).to_pylist()
    assert cli_main(["query", "--output", local_output, sql, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == want
    assert cli_main(["query", "--output", local_output, sql, "--format", "csv", "--to", str(tmp_path / "r.csv")]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [(r["status"], int(r["n"])) for r in rows] == [(w["status"], w["n"]) for w in want]
    assert cli_main(["query", "--output", local_output, sql, "--format", "parquet", "--to", str(tmp_path / "r.parquet")]) == 0
    assert pq.read_table(tmp_path / "r.parquet").to_pylist() == want
    assert cli_main(["query", "--output", local_output, sql]) == 0
    assert "error" in capsys.readouterr().out
    assert cli_main(["query", "--output", local_output, sql, "--format", "parquet"]) == 1  # needs --to


def test_query_on_s3_with_env_endpoint(moto_s3, s3_bucket, local_output):  # noqa: F811
    client = boto3.client("s3", endpoint_url=moto_s3)
    for path in Path(local_output).rglob("*.parquet"):
        key = f"out/{path.relative_to(local_output).as_posix()}"
        client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    for sql in QUERIES:
        assert query(f"s3://{s3_bucket}/out", sql).to_pylist() == duckdb_reference(local_output, sql).to_pylist()


def test_an_empty_block_commits_nothing(tmp_path):
    """A block whose objects were all sniffed away (extension-less, not images) writes no files."""
    config = DetectConfig(
        output_uri=str(tmp_path), run_id="r", arch="x", weights=None, model_name="m", weights_digest="d",
        class_names=CLASS_NAMES,
    )
    summary = write_block(_results(["s3://b/x.jpg", "s3://b/y.jpg"], 0).slice(0, 0), config=config)
    assert summary.to_pylist() == [{"images": 0, "ok": 0, "error": 0, "detections": 0, "nodes": "{}"}]
    assert not list(tmp_path.rglob("*.parquet"))
