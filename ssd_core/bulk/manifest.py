"""Manifests: the input objects named in a file instead of listed, so a huge bucket needs no LIST.

``--input-manifest`` takes a local path or ``s3://`` URI of:

- an S3 Inventory ``manifest.json`` (CSV, Parquet or ORC inventory): its data files are read, with the
  column order of its ``fileSchema``; CSV keys are URL-decoded as the inventory encodes them; with
  versions in the inventory only the latest, non-deleted version of each key counts;
- an S3 Inventory data file on its own (``.csv`` / ``.csv.gz`` without a header: Bucket, Key, Size,
  LastModifiedDate, ETag, the order of an inventory without optional version fields; or ``.parquet`` /
  ``.orc`` with columns bucket, key, size, e_tag);
- a CSV with a header, or a Parquet file, naming the object in ``image_uri`` / ``uri`` / ``url`` /
  ``path``, or in ``key`` (plus ``bucket``, or relative to ``--input``), with optional ``size`` /
  ``size_bytes`` and ``etag`` / ``e_tag`` columns;
- any other file (``.txt``, ``.txt.gz``...): one URI, path or key per line.

Keys without a scheme or bucket are taken relative to ``--input``. The size and ETag a manifest gives
go into the ledger key exactly as a listing's do, so a manifest and a listing of the same unchanged
objects are interchangeable; a manifest without them (a plain list) gives size 0 and an empty ETag, so
an object replaced under the same key is not detected again. Objects are filtered by extension as in a
listing (``ssd_core.bulk.listing.input_objects``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from ssd_core import storage
from ssd_core.bulk import listing

__all__ = ["ManifestFile", "manifest_files", "read_manifest_file"]

# Column order of an inventory CSV without optional version fields (its manifest.json says otherwise).
INVENTORY_CSV_COLUMNS = ["Bucket", "Key", "Size", "LastModifiedDate", "ETag"]
_URI_COLUMNS = ("image_uri", "uri", "url", "path", "s3_uri")
_SIZE_COLUMNS = ("size_bytes", "size")
_ETAG_COLUMNS = ("etag", "e_tag")


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest and how to read it (one read task each)."""

    uri: str
    format: str  # "inventory-csv" | "csv" | "parquet" | "orc" | "text"
    columns: tuple[str, ...] = ()  # inventory CSV column names (no header in the file)
    size: int = 0  # bytes, when known (to size the anti-join)


def manifest_files(manifest_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[ManifestFile]:
    """The files to read for ``manifest_uri`` (several for an S3 Inventory ``manifest.json``)."""
    fs, path = storage.filesystem_for(manifest_uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {manifest_uri}")
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(".json"):
        return _inventory_files(manifest_uri, json.loads(fs.cat_file(path)))
    size = int(fs.info(path).get("size") or 0)
    stem = name.removesuffix(".gz").removesuffix(".zst").removesuffix(".bz2")
    if stem.endswith(".parquet"):
        return [ManifestFile(manifest_uri, "parquet", size=size)]
    if stem.endswith(".orc"):
        return [ManifestFile(manifest_uri, "orc", size=size)]
    if stem.endswith(".csv"):
        with storage.open_uri(manifest_uri, "rb", storage_options) as handle:
            first = _first_line(handle, compressed=name.endswith(".gz"))
        header = [field.strip().strip('"').lower() for field in first.split(",")]
        if any(column in header for column in _URI_COLUMNS + ("key",)):
            return [ManifestFile(manifest_uri, "csv", size=size)]
        return [ManifestFile(manifest_uri, "inventory-csv", tuple(INVENTORY_CSV_COLUMNS), size=size)]
    return [ManifestFile(manifest_uri, "text", size=size)]


def _first_line(handle, *, compressed: bool) -> str:
    import gzip

    stream = gzip.GzipFile(fileobj=handle) if compressed else handle
    return stream.readline(1 << 16).decode("utf-8", "replace")


def _inventory_files(manifest_uri: str, document: Mapping[str, Any]) -> list[ManifestFile]:
    """Data files of an S3 Inventory manifest.json: on S3 in its destination bucket; for a local copy of
    an inventory, in the ``data/`` folder beside the manifest's dated folder (the inventory's layout)."""
    try:
        file_format = str(document["fileFormat"]).lower()
        entries = document["files"]
    except KeyError as exc:
        raise ValueError(f"manifest {manifest_uri}: not an S3 Inventory manifest.json (no {exc.args[0]!r})") from None
    if file_format not in ("csv", "parquet", "orc"):
        raise ValueError(f"manifest {manifest_uri}: inventory format {document['fileFormat']!r} is not supported")
    columns: tuple[str, ...] = ()
    if file_format == "csv":
        columns = tuple(part.strip() for part in str(document.get("fileSchema", "")).split(",") if part.strip())
        if "Key" not in columns:
            raise ValueError(f"manifest {manifest_uri}: fileSchema {document.get('fileSchema')!r} has no Key")
    bucket = str(document.get("destinationBucket", "")).rsplit(":", 1)[-1]
    files = []
    for entry in entries:
        key = entry["key"]
        if storage.is_s3(manifest_uri):
            uri = f"s3://{bucket}/{key}"
        else:
            dated = os.path.dirname(os.path.abspath(manifest_uri))
            uri = os.path.join(os.path.dirname(dated), "data", key.rsplit("/", 1)[-1])
        files.append(ManifestFile(uri, "inventory-csv" if file_format == "csv" else file_format, columns,
                                  int(entry.get("size") or 0)))
    return files


def read_manifest_file(file: ManifestFile, input_uri: str | None = None,
                       storage_options: Mapping[str, Any] | None = None):
    """One manifest file -> the listing ``pyarrow.Table`` (image_uri, size_bytes, etag, sniff) of the
    inputs it names (runs in a Ray task)."""
    import pyarrow.csv as pacsv

    compression = "gzip" if file.uri.endswith(".gz") else None
    with storage.open_uri(file.uri, "rb", storage_options) as raw:
        if file.format in ("parquet", "orc"):
            import pyarrow.orc as paorc
            import pyarrow.parquet as pq

            table = pq.read_table(raw) if file.format == "parquet" else paorc.ORCFile(raw).read()
        else:
            import pyarrow as pa

            stream = pa.CompressedInputStream(raw, compression) if compression else raw
            if file.format == "text":
                lines = stream.read().decode("utf-8").splitlines()
                table = pa.table({"uri": [line.strip() for line in lines if line.strip()]})
            else:
                read = pacsv.ReadOptions(column_names=list(file.columns) or None, block_size=1 << 24)
                # Names and ETags stay strings even when they look like numbers ("00123" is a key).
                as_text = {variant: pa.string() for name in _URI_COLUMNS + ("key", "bucket") + _ETAG_COLUMNS
                           for variant in (name, name.upper(), name.capitalize(), "ETag")}
                table = pacsv.read_csv(stream, read_options=read,
                                       convert_options=pacsv.ConvertOptions(column_types=as_text))
    return _normalise(table, file, input_uri)


def _normalise(table, file: ManifestFile, input_uri: str | None):
    """A manifest's columns (whatever their names and case) -> listing rows, filtered like a listing
    (``listing.input_objects``). Vectorised in Arrow: one inventory file holds millions of keys."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = {name.lower(): name for name in table.column_names}

    def column(*names: str):
        for name in names:
            if name in columns:
                return table[columns[name]].combine_chunks()
        return None

    def truthy(values):
        return pc.is_in(pc.utf8_lower(values.cast(pa.string())), value_set=pa.array(["true", "1"]))

    keep = None  # only the latest, non-deleted version of each key counts
    if (latest := column("islatest", "is_latest")) is not None:
        keep = pc.fill_null(truthy(latest), True)
    if (deleted := column("isdeletemarker", "is_delete_marker")) is not None:
        alive = pc.invert(pc.fill_null(truthy(deleted), False))
        keep = alive if keep is None else pc.and_(keep, alive)
    if keep is not None:
        table = table.filter(keep)

    uris = column(*_URI_COLUMNS)
    if uris is None:
        keys = column("key")
        if keys is None:
            raise ValueError(f"manifest {file.uri}: no column naming the objects "
                             f"(one of {', '.join(_URI_COLUMNS + ('key',))}; has {', '.join(table.column_names)})")
        keys = keys.cast(pa.string())
        if file.format == "inventory-csv":
            keys = _url_decoded(keys)  # inventory CSVs URL-encode keys
        buckets = column("bucket")
        uris = keys if buckets is None else pc.binary_join_element_wise("s3://", buckets.cast(pa.string()), "/", keys, "")
    uris = pc.utf8_trim_whitespace(uris.cast(pa.string()))
    uris = _absolute(uris, input_uri, file.uri)
    n = len(uris)
    sizes = column(*_SIZE_COLUMNS)
    etags = column(*_ETAG_COLUMNS)
    return listing.input_objects(uris, sizes if sizes is not None else pa.nulls(n, pa.int64()),
                                 etags if etags is not None else pa.nulls(n, pa.string()))


def _url_decoded(keys):
    """URL-decode (``+`` is a space) the keys that need it; the rest stay as they are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.fill_null(pc.match_substring_regex(keys, r"[%+]"), False)
    if not pc.any(encoded).as_py():
        return keys
    decoded = pa.array([unquote_plus(key) for key in keys.filter(encoded).to_pylist()], pa.string())
    return pc.replace_with_mask(keys, encoded, decoded)


def _absolute(uris, input_uri: str | None, manifest_uri: str):
    """Keys without a scheme or leading ``/`` joined onto ``input_uri``."""
    import pyarrow.compute as pc

    relative = pc.invert(pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/")))
    if not pc.any(relative).as_py():
        return uris
    if input_uri is None:
        example = uris.filter(relative)[0].as_py()
        raise ValueError(f"manifest {manifest_uri}: {example!r} is a relative key; give --input (the folder or "
                         "s3:// prefix it is relative to)")
    joined = pc.binary_join_element_wise(input_uri.rstrip("/") + "/", pc.utf8_ltrim(uris, "/"), "")
    return pc.if_else(relative, joined, uris)
