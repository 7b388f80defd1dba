"""``ssd compact``: merge the small block files of committed runs into large ones, without changing what
any query returns.

Detect writes one file pair per block (at most ``--rows-per-file`` images, usually far fewer bytes than
engines like). Compaction merges, within each ``run_id=`` partition (the Hive partition is the run, so
files of different runs never merge), consecutive committed block files into ``compact-<id>.parquet``
pairs of about ``TARGET_FILE_BYTES``, rows unchanged (``block_id`` kept, so the ``detections`` view's
join with the ledger still holds).

Target: 256 MiB per (detections) file. Spark (``spark.sql.files.maxPartitionBytes`` 128 MiB), Trino and
Athena (which split and plan per file and prefer 128 MiB - 1 GiB) read files of a few hundred MB at full
speed; much smaller files cost a request and a footer read each (the overhead this removes), much larger
ones only make a compaction hold more of the table in flight. Files are streamed row group by row group,
so memory stays at one source file, not the target.

The commit, per merged group, reusing the block commit protocol (``ssd_core.bulk.ledger``):

1. both compacted files are written whole under ``OUTPUT/_staging/`` (outside the tables);
2. the detections file is moved into ``detections/run_id=R/``: it does not count yet (no images file of
   that name), ``ssd query`` ignores it and a crash here leaves an orphan the next writer removes;
3. the images file is moved into ``images/run_id=R/``: the commit. Its Parquet metadata names the files
   it replaces, and from this moment ``ssd query`` (and the next run's ledger read) reads the compacted
   pair and not those files, even while they still exist;
4. the replaced files are deleted, images first; a crash here leaves them to the next writer
   (``ledger.remove_uncommitted``, which every detect run and every compaction calls first).

So ``ssd query`` and detect's ledger see every row exactly once at every point. A plain reader of the
table paths (pandas, DuckDB ``read_parquet``, Spark, Athena) sees each row once before step 2 and after
step 4; between step 2 and the end of step 4 (a rename and a few deletes per group locally; a server-side
copy and deletes on S3) it can see the group's rows twice, and after a crash inside that window until the
next detect or compact run. Schedule compaction where no such reader runs, e.g. right after detection in
the ``detect-bucket`` flow (``compact=True``).

One writer at a time: compaction must not run while a detect run writes to the same output. The
``detect-bucket`` flow's compaction step and the ``compact-output`` flow hold the same Prefect lock per
output as detection; from the command line, run ``ssd compact`` only when no detection of that output
is running.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from ssd_core import storage
from ssd_core.bulk import ledger

log = logging.getLogger(__name__)

__all__ = ["TARGET_FILE_BYTES", "compact_output"]

TARGET_FILE_BYTES = 256 * 2**20
ROW_GROUP_ROWS = 1_000_000  # ~10-50 MB per row group for these narrow tables


def _step(name: str) -> None:
    """Between the steps of a group's commit (a seam for tests that simulate a crash there)."""


def compact_output(output_uri: str, *, target_bytes: int = TARGET_FILE_BYTES,
                   storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Merge the committed block files of ``output_uri`` into files of about ``target_bytes`` (see the
    module docstring). Returns files_before, files_after (both tables) and groups (merged groups)."""
    ledger.remove_uncommitted(output_uri, storage_options)  # also finishes an interrupted compaction
    fs, root = storage.filesystem_for(output_uri, storage_options)
    images = ledger.table_files(output_uri, "images", storage_options)
    detections = ledger.table_files(output_uri, "detections", storage_options)
    files_before = len(images) + len(detections)
    sizes = {path: int(info.get("size") or 0) for path, info in _infos(fs, images + detections).items()}
    detections_by_key = {_key(p): p for p in detections}
    by_partition: dict[str, list[str]] = {}
    for path in images:
        by_partition.setdefault(_key(path)[0], []).append(path)
    groups = 0
    for partition, paths in sorted(by_partition.items()):
        for group in _groups(sorted(paths), detections_by_key, sizes, target_bytes):
            _compact_group(output_uri, root, fs, partition, group, detections_by_key, storage_options)
            groups += 1
    files_after = len(ledger.table_files(output_uri, "images", storage_options))
    files_after += len(ledger.table_files(output_uri, "detections", storage_options))
    log.info("compacted %s: %d files -> %d (%d groups)", output_uri, files_before, files_after, groups)
    return {"files_before": files_before, "files_after": files_after, "groups": groups}


def _infos(fs, paths: list[str]) -> dict[str, dict]:
    parents = {p.rsplit("/", 1)[0] for p in paths}
    wanted = set(paths)
    infos = {}
    for parent in parents:
        for info in fs.ls(parent, detail=True):
            if info["name"] in wanted:
                infos[info["name"]] = info
    return infos


def _key(path: str) -> tuple[str, str]:
    parts = path.rstrip("/").split("/")
    return parts[-2], parts[-1]


def _groups(images: list[str], detections_by_key: dict, sizes: dict, target_bytes: int) -> list[list[str]]:
    """Consecutive images files whose pairs add up to about ``target_bytes`` (by the larger table's bytes),
    skipping files already at least half the target; groups of one are left alone."""
    groups, current, current_bytes = [], [], 0
    for path in images:
        detections = detections_by_key.get(_key(path))
        size = max(sizes.get(path, 0), sizes.get(detections, 0) if detections else 0)
        if size >= target_bytes // 2:
            continue
        if current and current_bytes + size > target_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(path)
        current_bytes += size
    groups.append(current)
    return [group for group in groups if len(group) > 1]


def _compact_group(output_uri: str, root: str, fs, partition: str, images: list[str], detections_by_key: dict,
                   storage_options) -> None:
    names = [_key(path)[1] for path in images]
    name = f"{ledger.COMPACT_PREFIX}{hashlib.sha256(json.dumps(names).encode()).hexdigest()[:20]}.parquet"
    replaces = {ledger.REPLACES_KEY: json.dumps(names).encode()}
    staged = {}
    for table, schema, sources in (
        ("detections", ledger.detections_schema(),
         [detections_by_key[_key(p)] for p in images if _key(p) in detections_by_key]),
        ("images", ledger.images_schema(), images),
    ):
        staged[table] = storage.join_uri(output_uri, ledger.STAGING, partition, f"{table}-{name}")
        _merge(fs, sources, staged[table], schema.with_metadata(replaces), storage_options)
    _step("staged")
    storage.atomic_move(staged["detections"], storage.join_uri(output_uri, "detections", partition, name),
                        storage_options)
    _step("detections")
    # The commit: from here the compacted pair counts and the files it replaces do not.
    storage.atomic_move(staged["images"], storage.join_uri(output_uri, "images", partition, name), storage_options)
    _step("images")
    fs.rm(images)
    _step("deleted-images")
    replaced = [detections_by_key[_key(p)] for p in images if _key(p) in detections_by_key]
    if replaced:
        fs.rm(replaced)


def _merge(fs, sources: list[str], target: str, schema, storage_options) -> None:
    """Stream ``sources`` (Parquet, read with ``schema``: columns an older file lacks come back null) into
    one zstd Parquet file at ``target`` (local or s3://), in row groups of ``ROW_GROUP_ROWS`` rows (the
    small files' own row groups would stay small otherwise)."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    pa_fs, _ = storage.pyarrow_filesystem_for(target, storage_options)
    dataset = pads.dataset(sources, filesystem=pa_fs, format="parquet", schema=schema.remove_metadata())
    with storage.open_uri(target, "wb", storage_options) as handle:
        with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
            pending, rows = [], 0
            for batch in dataset.to_batches():
                pending.append(batch)
                rows += batch.num_rows
                if rows >= ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS)
                    pending, rows = [], 0
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS)
