"""What bulk detection works on: the input objects under a folder or ``s3://bucket/prefix``, or those a
manifest names (``ssd_core.bulk.manifest``).

Listing is recursive. An object is an input if its extension is an image extension, or if it has no
extension (its first bytes decide, sniffed in the read tasks; extension-less non-images get no row).
Hidden files (a leading ``.``) are skipped.

A big bucket is listed in parallel: one task lists the top level of the input (its files, and the
names of its sub-folders), then one task per sub-folder lists it recursively (``ssd_core.bulk.pending``);
the driver only ever holds folder names. A flat bucket with very many objects at its top level is
still one task's listing: give such buckets a manifest (S3 Inventory) instead.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ssd_core import storage
from ssd_core.images import IMAGE_EXTENSIONS

__all__ = ["list_images", "list_top_level", "input_kind", "listing_table"]


def input_kind(name: str) -> bool | None:
    """None if an object named ``name`` (its last path segment) is not an input; else whether its content
    must be sniffed (no extension)."""
    if not name or name.startswith("."):
        return None  # folder placeholders, hidden files, our own temp files
    extension = os.path.splitext(name)[1].lower()
    if extension and extension not in IMAGE_EXTENSIONS:
        return None
    return not extension


def listing_table(rows: Iterable[tuple[str, int, str, bool]]):
    """(image_uri, size_bytes, etag, sniff) rows -> the listing ``pyarrow.Table``, sorted by image_uri."""
    import pyarrow as pa

    uris, sizes, etags, sniff = [], [], [], []
    for uri, size, etag, needs_sniff in rows:
        uris.append(uri)
        sizes.append(size)
        etags.append(etag)
        sniff.append(needs_sniff)
    table = pa.table(
        {
            "image_uri": pa.array(uris, pa.string()),
            "size_bytes": pa.array(sizes, pa.int64()),
            "etag": pa.array(etags, pa.string()),
            "sniff": pa.array(sniff, pa.bool_()),
        }
    )
    return table.sort_by("image_uri")


def list_images(input_uri: str, storage_options: Mapping[str, Any] | None = None):
    """Recursive listing -> ``pyarrow.Table`` (image_uri, size_bytes, etag, sniff) sorted by image_uri.

    ``etag`` is the S3 ETag (quotes stripped), or the modification time in ns for local files.
    ``sniff`` marks extension-less objects whose content decides whether they are images.
    """
    fs, root = storage.filesystem_for(input_uri, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {input_uri}")
    entries = {root: fs.info(root)} if fs.isfile(root) else fs.find(root, detail=True)
    return listing_table(_rows(entries.items(), storage.is_s3(input_uri)))


def list_top_level(input_uri: str, storage_options: Mapping[str, Any] | None = None):
    """The top level of ``input_uri``: (listing table of its own files, URIs of its sub-folders)."""
    fs, root = storage.filesystem_for(input_uri, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {input_uri}")
    s3 = storage.is_s3(input_uri)
    if fs.isfile(root):
        return listing_table(_rows([(root, fs.info(root))], s3)), []
    entries = [(info["name"], info) for info in fs.ls(root, detail=True)]
    folders = [f"s3://{path}" if s3 else path for path, info in entries
               if info.get("type") == "directory" and path.rstrip("/") != root.rstrip("/")]
    return listing_table(_rows(entries, s3)), sorted(folders)


def _rows(entries, s3: bool):
    for path, info in entries:
        if info.get("type") == "directory":
            continue
        sniff = input_kind(path.rsplit("/", 1)[-1])
        if sniff is None:
            continue
        yield (f"s3://{path}" if s3 else path), int(info.get("size") or 0), _etag_of(info), sniff


def _etag_of(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, _dt.datetime):
        return mtime.isoformat()
    return f"mtime:{int(float(mtime) * 1e9)}" if mtime is not None else ""
