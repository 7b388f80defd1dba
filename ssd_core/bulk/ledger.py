"""The two output tables of bulk detection, the ledger that makes it exactly-once, and the commit protocol.

Under ``OUTPUT`` (zstd Parquet, Hive-partitioned by ``run_id``):

- ``detections/run_id=R/block-<id>.parquet``: one row per box (``detections_schema``);
- ``images/run_id=R/block-<id>.parquet``: one row per input object (``images_schema``). This table is
  the ledger.

Any engine that reads these paths directly (DuckDB ``read_parquet('OUTPUT/detections/**/*.parquet',
hive_partitioning=true)``, pandas, Spark, Athena) sees only committed rows. A block's two files are
first written whole under ``OUTPUT/_staging/`` (outside both tables; Hive-style readers also skip
``_``-prefixed paths), then moved into the tables, detections first and images last: the images file
appearing is the commit. Each move is atomic (local: rename; S3: server-side copy, visible only once
complete). A run that is killed can leave at most a staged pair and a detections file without its
images file; the next run removes both before it starts (and ``ssd query`` ignores them meanwhile).
The block id is a hash of the block's (image_uri, etag) pairs and the weights digest, so a retried
task rewrites the same names and never adds a second copy. The ledger key is (image_uri, etag,
size_bytes, weights_digest): a run processes only objects not yet in it. One writer per output at a
time (the ``detect-bucket`` flow holds a lock per output).

Compaction (``ssd_core.bulk.compact``) replaces a run's block files by ``compact-<id>.parquet`` pairs
committed the same way (detections, then images); a compacted images file names the files it replaces
in its Parquet metadata (``ssd.replaces``), and from the moment it exists those files no longer count
(``table_files``), even before they are deleted. The next writer deletes what an interrupted compaction
left (``remove_uncommitted``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from ssd_core import storage

log = logging.getLogger(__name__)

__all__ = [
    "LEDGER_KEY",
    "detections_schema",
    "images_schema",
    "weights_digest",
    "block_id_of",
    "open_table",
    "read_ledger",
    "empty_ledger",
    "committed_images_files",
    "table_files",
    "pending_objects",
    "commit_block",
    "remove_uncommitted",
]

LEDGER_KEY = ["image_uri", "etag", "size_bytes", "weights_digest"]
STAGING = "_staging"  # where block files are written before they are moved into the tables
COMPACT_PREFIX = "compact-"  # compacted files: compact-<id>.parquet
REPLACES_KEY = b"ssd.replaces"  # Parquet metadata of a compacted file: JSON list of the names it replaces


def detections_schema():
    """Schema of the files under ``detections/`` (``run_id`` comes from the Hive partition)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image_uri", pa.string()),
            ("label", pa.int32()),
            ("label_name", pa.string()),
            ("score", pa.float32()),
            ("x1", pa.float32()),
            ("y1", pa.float32()),
            ("x2", pa.float32()),
            ("y2", pa.float32()),
            ("image_width", pa.int32()),
            ("image_height", pa.int32()),
            ("model", pa.string()),
            ("weights_digest", pa.string()),
            ("block_id", pa.string()),
        ]
    )


def images_schema():
    """Schema of the files under ``images/`` (the ledger; ``run_id`` comes from the Hive partition)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image_uri", pa.string()),
            ("size_bytes", pa.int64()),
            ("etag", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("num_detections", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("model", pa.string()),
            ("weights_digest", pa.string()),
            ("block_id", pa.string()),
            ("processed_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def weights_digest(weights: str | os.PathLike | None, arch: str | None, seed: int = 0,
                   storage_options: Mapping[str, Any] | None = None) -> str:
    """``sha256:<hex>`` of the weights file, or ``random-init-<arch>-<seed>`` without weights."""
    if weights is None:
        return f"random-init-{arch}-{seed}"
    digest = hashlib.sha256()
    with storage.open_uri(weights, "rb", storage_options) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def block_id_of(image_uris, etags, weights_digest: str) -> str:
    """Deterministic id of a block: a retried or re-run block with the same content gets the same files."""
    digest = hashlib.sha256(weights_digest.encode())
    for uri, etag in sorted(zip(image_uris, etags)):
        digest.update(f"\n{uri}\t{etag}".encode())
    return digest.hexdigest()[:20]


# -------------------------------------------------------------------------------------- reading


def open_table(output_uri: str, table: str, storage_options: Mapping[str, Any] | None = None):
    """pyarrow dataset of the committed files of OUTPUT/<table> (``images`` or ``detections``; see
    ``table_files``) with ``run_id`` (string) from the Hive partition; None if there are none."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    files = table_files(output_uri, table, storage_options)
    if not files:
        return None
    fs, root = storage.pyarrow_filesystem_for(storage.join_uri(output_uri, table), storage_options)
    schema = images_schema() if table == "images" else detections_schema()
    partitioning = pads.partitioning(pa.schema([("run_id", pa.string())]), flavor="hive")
    return pads.dataset(files, filesystem=fs, format="parquet", partitioning=partitioning,
                        partition_base_dir=root, schema=schema.insert(0, pa.field("run_id", pa.string())))


def read_ledger(output_uri: str, storage_options: Mapping[str, Any] | None = None, columns=None):
    """Committed ``images/`` rows (every images file is a commit), or an empty table."""

    dataset = open_table(output_uri, "images", storage_options)
    if dataset is None:
        return empty_ledger(columns)
    return dataset.to_table(columns=columns)


def empty_ledger(columns=None):
    """An empty table of ledger columns (the key by default)."""
    import pyarrow as pa

    schema = images_schema()
    return pa.table({name: pa.array([], schema.field(name).type) for name in columns or LEDGER_KEY})


def committed_images_files(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Paths (inside the filesystem: ``bucket/key`` on S3) of the committed ledger files, sorted."""
    return table_files(output_uri, "images", storage_options)


def table_files(output_uri: str, table: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files of ``table`` (``images`` or ``detections``) that hold committed rows, each row once:
    images files not replaced by a compacted one; detections files whose images file exists, likewise.
    Paths inside the filesystem (``bucket/key`` on S3), sorted."""
    fs, root = storage.filesystem_for(output_uri, storage_options)
    images = _parquet_files(fs, f"{root}/images")
    replaced = _replaced(fs, images)
    if table == "images":
        return sorted(p for p in images if _block_key(p) not in replaced)
    committed = {_block_key(p) for p in images}
    return sorted(p for p in _parquet_files(fs, f"{root}/{table}")
                  if _block_key(p) in committed and _block_key(p) not in replaced)


def _replaced(fs, images_files: list[str]) -> set[tuple[str, str]]:
    """(partition, name) of the files that committed compacted images files replace."""
    import json

    import pyarrow.parquet as pq

    replaced = set()
    for path in images_files:
        partition, name = _block_key(path)
        if name.startswith(COMPACT_PREFIX):
            with fs.open(path, "rb") as handle:
                metadata = pq.read_schema(handle).metadata or {}
            replaced.update((partition, n) for n in json.loads(metadata.get(REPLACES_KEY, b"[]")))
    return replaced


def pending_objects(listing, ledger, digest: str):
    """Listing rows whose (image_uri, etag, size_bytes, weights_digest) is not in the ledger."""
    import pyarrow as pa

    keyed = listing.append_column("weights_digest", pa.array([digest] * listing.num_rows, pa.string()))
    done = ledger.select(LEDGER_KEY).group_by(LEDGER_KEY).aggregate([])
    pending = keyed.join(done, keys=LEDGER_KEY, join_type="left anti")
    return pending.drop_columns(["weights_digest"]).sort_by("image_uri")


# -------------------------------------------------------------------------------------- writing


def parquet_bytes(table, row_group_size: int = 256_000) -> bytes:
    """``table`` as zstd Parquet bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def commit_block(output_uri: str, run_id: str, block_id: str, detections, images,
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Write one block: both files staged, then detections moved into place, then images (the commit)."""
    name = f"block-{block_id}.parquet"
    partition = f"run_id={run_id}"
    staged = {}
    for table, rows in (("detections", detections), ("images", images)):
        staged[table] = storage.join_uri(output_uri, STAGING, partition, f"{table}-{name}")
        storage.atomic_write_bytes(staged[table], parquet_bytes(rows), storage_options)
    storage.atomic_move(staged["detections"], storage.join_uri(output_uri, "detections", partition, name),
                        storage_options)
    # Moved last: this file is the commit of the whole block.
    storage.atomic_move(staged["images"], storage.join_uri(output_uri, "images", partition, name), storage_options)


def remove_uncommitted(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Delete what a killed run or compaction left outside the committed tables: staged files, files that
    a committed compaction replaces, and detections files whose block has no images file. Returns how
    many detections files were removed as uncommitted. Only safe while no other run writes to
    ``output_uri``."""
    fs, root = storage.filesystem_for(output_uri, storage_options)
    staging = f"{root}/{STAGING}"
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    images = _parquet_files(fs, f"{root}/images")
    replaced = _replaced(fs, images)
    if replaced:
        # An interrupted compaction: its files are committed, the ones they replace still there. Images
        # first, so a file that stays (if this is interrupted too) is still replaced, never an orphan.
        stale = [p for p in images if _block_key(p) in replaced]
        stale += [p for p in _parquet_files(fs, f"{root}/detections") if _block_key(p) in replaced]
        if stale:
            fs.rm(stale)
            log.info("removed %d file(s) that an interrupted compaction had replaced", len(stale))
        images = [p for p in images if _block_key(p) not in replaced]
    committed = {_block_key(path) for path in images}
    orphans = [path for path in _parquet_files(fs, f"{root}/detections") if _block_key(path) not in committed]
    if orphans:
        fs.rm(orphans)
        log.info("removed %d uncommitted detections file(s) from an interrupted run", len(orphans))
    return len(orphans)


def _parquet_files(fs, root: str) -> list[str]:
    """Parquet files under ``root``, skipping names under a ``.`` or ``_`` path segment (as readers do)."""
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    prefix = len(root.rstrip("/")) + 1
    return [p for p in found if p.endswith(".parquet")
            and not any(part.startswith((".", "_")) for part in p[prefix:].split("/"))]


def _block_key(path: str) -> tuple[str, str]:
    """(run partition dir, file name) of a block file."""
    parts = path.rstrip("/").split("/")
    return parts[-2], parts[-1]
