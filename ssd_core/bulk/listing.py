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
from collections.abc import Iterable, Mapping
from typing import Any

from ssd_core import storage
from ssd_core.images import IMAGE_EXTENSIONS

__all__ = ["list_images", "list_top_level", "input_objects", "listing_table"]


def input_objects(uris, sizes, etags):
    """Arrow arrays (or lists) of objects -> the listing ``pyarrow.Table`` (image_uri, size_bytes, etag,
    sniff) of those that are inputs, in the given order. Vectorised: a manifest of millions of keys is
    filtered in Arrow, not in a Python loop.

    Not inputs: names ending in ``/`` (folder placeholders), hidden names (a leading ``.``), and names
    whose extension is not an image extension. ``sniff`` marks names without an extension. ``etag``
    loses surrounding quotes; a missing size is 0, a missing ETag "".
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    uris = pa.array(uris, pa.string()) if not isinstance(uris, pa.Array) else uris.cast(pa.string())
    name = pc.replace_substring_regex(uris, r"^.*/", "")  # the last path segment ("" for "x/")
    extension = pc.struct_field(pc.extract_regex(name, r"(?P<ext>[^.]\.[^.]*)$"), [0])
    extension = pc.utf8_lower(pc.utf8_slice_codeunits(extension, 1))
    hidden = pc.or_(pc.starts_with(name, "."), pc.equal(pc.utf8_length(name), 0))
    no_extension = pc.is_null(extension)
    image = pc.is_in(extension, value_set=pa.array(sorted(IMAGE_EXTENSIONS)))
    keep = pc.and_(pc.invert(pc.fill_null(hidden, True)), pc.or_(no_extension, pc.fill_null(image, False)))
    sizes = pa.array(sizes) if not isinstance(sizes, pa.Array) else sizes
    etags = pa.array(etags) if not isinstance(etags, pa.Array) else etags
    table = pa.table({
        "image_uri": uris,
        "size_bytes": pc.fill_null(sizes.cast(pa.int64()), 0),
        "etag": pc.utf8_trim(pc.fill_null(etags.cast(pa.string()), ""), '"'),
        "sniff": no_extension,
    })
    return table.filter(keep)


def listing_table(rows: Iterable[tuple[str, int, str]]):
    """(path or URI, size, etag) of listed files -> the listing ``pyarrow.Table`` of the inputs among
    them (``input_objects``), sorted by image_uri."""
    uris, sizes, etags = [], [], []
    for uri, size, etag in rows:
        uris.append(uri)
        sizes.append(size)
        etags.append(etag)
    return input_objects(uris, sizes, etags).sort_by("image_uri")


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
        if info.get("type") != "directory":
            yield (f"s3://{path}" if s3 else path), int(info.get("size") or 0), _etag_of(info)


def _etag_of(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, _dt.datetime):
        return mtime.isoformat()
    return f"mtime:{int(float(mtime) * 1e9)}" if mtime is not None else ""
