"""``ssd compact``: every ``ssd query`` result and every plain Parquet read of the table paths is the same
before and after compaction, with fewer files; a compaction killed between any two of its steps leaves
``ssd query`` exact at once and plain readers exact after the next run; locally and on moto S3."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import duckdb
import pandas as pd
import pytest
from s3_server import moto_s3, s3_bucket  # noqa: F401
from test_query import CLASS_NAMES, _results, write_output

from ssd_core.bulk import compact, ledger
from ssd_core.bulk.stages import DetectConfig, write_block
from ssd_core.cli import main as cli_main
from ssd_core.query import query

SQL = [
    "SELECT * FROM images ORDER BY ALL",
    "SELECT * FROM detections ORDER BY ALL",
    "SELECT run_id, label_name, count(*) AS n, round(avg(score), 6) AS s FROM detections GROUP BY ALL ORDER BY ALL",
    "SELECT status, count(*) AS n, sum(num_detections) AS boxes FROM images GROUP BY ALL ORDER BY ALL",
    "SELECT i.image_uri, i.num_detections, count(d.label) AS n FROM images i "
    "LEFT JOIN detections d USING (run_id, image_uri) GROUP BY ALL ORDER BY ALL",
    "SELECT count(DISTINCT image_uri) AS images, count(*) AS rows FROM images",
]


class Killed(Exception):
    pass


def make_output(output: str) -> None:
    """Two runs of two blocks (plus a killed run's orphan detections file) and a run of seven blocks."""
    write_output(output)
    config = DetectConfig(output_uri=output, run_id="run-d", arch="x", weights=None, model_name="ssdlite_test",
                          weights_digest="digest-d", class_names=CLASS_NAMES)
    for block in range(7):
        write_block(_results([f"s3://bucket/run-d/{block}/img{i}.jpg" for i in range(5)], 40 + block), config=config)
    ledger.remove_uncommitted(output)  # what any next run does first: plain readers now see committed rows only


def plain_reads(output: str) -> dict[str, list]:
    """Every row of both table paths as pandas and DuckDB read them, knowing nothing of the ledger."""
    out = {}
    for table in ("images", "detections"):
        frame = pd.read_parquet(Path(output) / table)
        out[f"pandas-{table}"] = sorted(map(tuple, frame.astype(str).values.tolist()))
        rows = duckdb.sql(f"SELECT * FROM read_parquet('{output}/{table}/*/*.parquet', hive_partitioning=true)")
        out[f"duckdb-{table}"] = sorted(map(tuple, rows.df().astype(str).values.tolist()))
    return out


def queries(output: str) -> dict[str, list]:
    return {sql: query(output, sql).to_pylist() for sql in SQL}


def parquet_files(output: str) -> list[Path]:
    return sorted(p for p in Path(output).rglob("*.parquet") if "_staging" not in p.parts)


def test_compaction_keeps_every_query_and_plain_read_and_leaves_fewer_files(tmp_path, capsys):
    output = str(tmp_path / "out")
    make_output(output)
    before, plain = queries(output), plain_reads(output)
    files = parquet_files(output)
    size = max(p.stat().st_size for p in files)
    # A target of about three blocks: run-d's seven blocks become several groups, the other runs one each.
    assert cli_main(["compact", "--output", output, "--target-mb", str(3.5 * size / 2**20)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    after = parquet_files(output)
    assert summary["files_before"] == len(files) > summary["files_after"] == len(after)
    run_d = [p for p in after if p.parent.name == "run_id=run-d"]
    assert sum(p.name.startswith("compact-") for p in run_d) >= 4  # at least two pairs: the target holds
    assert all(p.name.startswith("compact-") for p in after if p.parent.name != "run_id=run-d")
    assert queries(output) == before
    assert plain_reads(output) == plain
    # Idempotent: a second compaction with a large target merges run-d's compacted files again.
    summary = compact.compact_output(output)
    assert summary["files_after"] == 2 * 3  # one pair per run
    assert queries(output) == before and plain_reads(output) == plain
    assert not list(Path(output).rglob("_staging/**/*.parquet"))


@pytest.mark.parametrize("step", ["staged", "detections", "images", "deleted-images"])
def test_compaction_killed_between_steps(tmp_path, monkeypatch, step):
    output = str(tmp_path / "out")
    make_output(output)
    before, plain = queries(output), plain_reads(output)

    def crash(name: str) -> None:
        if name == step:
            raise Killed(name)

    monkeypatch.setattr(compact, "_step", crash)
    with pytest.raises(Killed):
        compact.compact_output(output)
    # ssd query (and detect's ledger read, through the same file list) is exact at once...
    assert queries(output) == before
    uris = [u for p in ledger.table_files(output, "images") for u in pd.read_parquet(p)["image_uri"]]
    assert len(uris) == len(set(uris)) == len(before[SQL[0]])
    # ...and after the next run (here a compaction; a detect run cleans up the same way), plain readers too.
    monkeypatch.undo()
    compact.compact_output(output)
    assert queries(output) == before
    assert plain_reads(output) == plain
    assert not list(Path(output).rglob("_staging/**/*.parquet"))


def test_compaction_on_s3(moto_s3, s3_bucket, tmp_path):  # noqa: F811
    local = str(tmp_path / "out")
    make_output(local)
    client = boto3.client("s3", endpoint_url=moto_s3)
    for path in parquet_files(local):
        client.put_object(Bucket=s3_bucket, Key=f"out/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
    output = f"s3://{s3_bucket}/out"
    before = queries(output)
    summary = compact.compact_output(output)
    assert summary["files_after"] == 2 * 3 < summary["files_before"]
    assert queries(output) == before == queries(local)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]]
    assert len(keys) == 2 * 3 and all("/compact-" in key for key in keys)
