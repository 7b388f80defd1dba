"""SQL over bulk-detection outputs (see ``ssd_core.bulk.ledger``) with DuckDB.

Two views are defined over ``OUTPUT`` (local folder or ``s3://``):

- ``images``: run_id, image_uri, size_bytes, etag, width, height, num_detections, status, error,
  model, weights_digest, processed_at (one row per processed input object);
- ``detections``: run_id, image_uri, label, label_name, score, x1, y1, x2, y2, image_width,
  image_height, model, weights_digest (one row per box), restricted to committed blocks: a
  detections file counts only when its block's images file (the ledger commit) exists.

Files that a compaction replaced are left out as soon as the compacted images file exists, so a query
during or after an interrupted compaction sees every row once (``ssd_core.bulk.ledger.table_files``).

The Parquet files are opened as pyarrow datasets (Arrow's S3 client with the endpoint from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) and registered in DuckDB, rather than read with
DuckDB's httpfs: httpfs is a separate extension that DuckDB downloads on first use, which an
offline machine cannot do. Filters and projections are still pushed down into the scans.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ssd_core import storage

__all__ = ["connect", "query", "IMAGES_COLUMNS", "DETECTIONS_COLUMNS", "export_table"]

IMAGES_COLUMNS = (
    "run_id", "image_uri", "size_bytes", "etag", "width", "height", "num_detections", "status", "error",
    "model", "weights_digest", "processed_at",
)
DETECTIONS_COLUMNS = (
    "run_id", "image_uri", "label", "label_name", "score", "x1", "y1", "x2", "y2", "image_width",
    "image_height", "model", "weights_digest",
)


def connect(output_uri: str, storage_options: Mapping[str, Any] | None = None):
    """A DuckDB connection with the ``images`` and ``detections`` views over ``output_uri``."""
    import duckdb
    import pyarrow as pa

    from ssd_core.bulk.ledger import detections_schema, open_table

    images = open_table(output_uri, "images", storage_options)
    if images is None:
        raise FileNotFoundError(f"no bulk-detection output under {output_uri} (expected {output_uri}/images/)")
    detections = open_table(output_uri, "detections", storage_options)
    if detections is None:  # every block committed without a single box file cannot happen, but be safe
        detections = detections_schema().insert(0, pa.field("run_id", pa.string())).empty_table()

    con = duckdb.connect()
    con.register("_images_files", images)
    con.register("_detections_files", detections)
    con.execute(f"CREATE VIEW images AS SELECT {', '.join(IMAGES_COLUMNS)} FROM _images_files")
    columns = ", ".join(f"d.{name}" for name in DETECTIONS_COLUMNS)
    # Only blocks whose ledger file exists: a killed run may have left detections without it.
    con.execute(
        f"CREATE VIEW detections AS SELECT {columns} FROM _detections_files d "
        "SEMI JOIN (SELECT DISTINCT run_id, block_id FROM _images_files) c "
        "ON d.run_id = c.run_id AND d.block_id = c.block_id"
    )
    return con


def query(output_uri: str, sql: str, storage_options: Mapping[str, Any] | None = None):
    """Run ``sql`` against the ``detections`` and ``images`` views -> ``pyarrow.Table``."""
    import duckdb
    import pyarrow as pa

    con = connect(output_uri, storage_options)
    try:
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from None
    finally:
        con.close()


def export_table(table, fmt: str, to: str | None = None, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Encode ``table`` as csv | json (one array of records) | parquet (zstd); write it to ``to``
    (local or s3://) if given. Returns the encoded bytes."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "csv":
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink)
        data = sink.getvalue().to_pybytes()
    elif fmt == "json":
        data = (json.dumps(table.to_pylist(), default=_json_value) + "\n").encode()
    elif fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
    else:
        raise ValueError(f"format {fmt!r}: use csv, json or parquet")
    if to is not None:
        storage.atomic_write_bytes(to, data, storage_options)
    return data


def _json_value(value: Any) -> Any:
    """JSON for what DuckDB returns beyond JSON's types: DECIMAL (SUM of integers) -> number, times -> ISO."""
    from decimal import Decimal

    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
