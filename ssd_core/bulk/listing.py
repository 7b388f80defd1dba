"""What bulk detection works on: the input objects under a folder or ``s3://bucket/prefix``.

Listing is recursive. An object is an input if its extension is an image extension, or if it has no
extension (its first bytes decide, sniffed in the read tasks; extension-less non-images get no row).
Hidden files (a leading ``.``) are skipped.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import Any

from ssd_core import storage
from ssd_core.images import IMAGE_EXTENSIONS

__all__ = ["list_images"]


def list_images(input_uri: str, storage_options: Mapping[str, Any] | None = None):
    """Recursive listing -> ``pyarrow.Table`` (image_uri, size_bytes, etag, sniff) sorted by image_uri.

    ``etag`` is the S3 ETag (quotes stripped), or the modification time in ns for local files.
    ``sniff`` marks extension-less objects whose content decides whether they are images.
    """
    import pyarrow as pa

    fs, root = storage.filesystem_for(input_uri, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {input_uri}")
    if fs.isfile(root):
        entries = {root: fs.info(root)}
    else:
        entries = fs.find(root, detail=True)
    s3 = storage.is_s3(input_uri)
    uris, sizes, etags, sniff = [], [], [], []
    for path, info in sorted(entries.items()):
        if info.get("type") == "directory":
            continue
        name = path.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue  # hidden files, our own temp files
        extension = os.path.splitext(name)[1].lower()
        if extension and extension not in IMAGE_EXTENSIONS:
            continue
        uris.append(f"s3://{path}" if s3 else path)
        sizes.append(int(info.get("size") or 0))
        etags.append(_etag_of(info))
        sniff.append(not extension)
    return pa.table(
        {
            "image_uri": pa.array(uris, pa.string()),
            "size_bytes": pa.array(sizes, pa.int64()),
            "etag": pa.array(etags, pa.string()),
            "sniff": pa.array(sniff, pa.bool_()),
        }
    )


def _etag_of(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, _dt.datetime):
        return mtime.isoformat()
    return f"mtime:{int(float(mtime) * 1e9)}" if mtime is not None else ""
