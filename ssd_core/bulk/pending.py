"""What a run has to process, found on the cluster so the driver's memory does not grow with the bucket.

The inputs (a listing, or a manifest's files) and the committed ledger are read by Ray tasks, each
splitting its rows by a hash of ``image_uri`` into ``partitions`` parts; one anti-join task per part
then keeps the inputs whose ledger key (image_uri, etag, size_bytes, weights_digest) is not committed
(``ledger.pending_objects``). The driver holds object references and counts only: the pending rows
stay in the object store and flow from there into the Ray Data pipeline (``Pending.dataset``).

Memory: each read task holds one manifest file, one listed folder or ``LEDGER_FILES_PER_TASK`` ledger
files; each anti-join task one part of both (about ``ROWS_PER_PARTITION`` rows with the default
number of parts).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ssd_core.bulk import ledger

__all__ = ["Pending", "find_pending", "partition_of", "split_by_partition"]

LEDGER_FILES_PER_TASK = 64
ROWS_PER_PARTITION = 500_000
MANIFEST_BYTES_PER_ROW = 25  # compressed inventory CSV / Parquet: to size the parts before reading


@dataclass
class Pending:
    """The pending rows (listing schema) as object references, one per non-empty part, and counts."""

    refs: list = field(default_factory=list)
    part_rows: list[int] = field(default_factory=list)  # rows of each part in ``refs``
    num_rows: int = 0
    num_seen: int = 0  # distinct input objects

    def dataset(self, block_rows: int):
        """A Ray Dataset of the pending rows in blocks of ``block_rows`` rows (the last of a part fewer).

        The parts are cut by tasks that finish before the dataset exists, so the pipeline has no stage
        before the inference actors: on CPU-only clusters the actors hold every CPU, and a cutting stage
        in the pipeline would wait for one forever.
        """
        import ray

        split = ray.remote(_split_task)
        blocks = []
        for ref, rows in zip(self.refs, self.part_rows):
            count = -(-rows // block_rows)
            if count == 1:
                blocks.append(ref)
            else:
                blocks.extend(split.options(num_returns=count).remote(ref, block_rows))
        return ray.data.from_arrow_refs(blocks)


def _split_task(table, block_rows: int):
    """One part -> its consecutive slices of ``block_rows`` rows (compact copies, not views of the part)."""
    import numpy as np

    slices = [table.take(np.arange(start, min(start + block_rows, table.num_rows)))
              for start in range(0, table.num_rows, block_rows)]
    return slices if len(slices) > 1 else slices[0]


def partition_of(uris: Sequence[str], partitions: int):
    """Part of each image_uri: CRC-32 of its UTF-8 bytes mod ``partitions`` (the same in every process)."""
    import numpy as np

    return np.fromiter((zlib.crc32(uri.encode()) for uri in uris), dtype=np.uint32, count=len(uris)) % partitions


def split_by_partition(table, partitions: int) -> list:
    """``table`` -> ``partitions`` tables by ``partition_of(image_uri)``, each a compact copy."""
    import numpy as np

    parts = partition_of(table["image_uri"].to_pylist(), partitions)
    order = np.argsort(parts, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(parts, minlength=partitions))])
    return [table.take(order[bounds[p]:bounds[p + 1]]) for p in range(partitions)]


def _listing_task(kind: str, source, input_uri, partitions: int, storage_options):
    """Read one unit of input -> (summary, *parts). ``kind``: "top" (the input's top level; summary
    lists its sub-folders), "folder" (a sub-folder, recursively) or "manifest" (one manifest file)."""
    from ssd_core.bulk import listing, manifest

    folders: list[str] = []
    if kind == "top":
        table, folders = listing.list_top_level(source, storage_options)
    elif kind == "folder":
        table = listing.list_images(source, storage_options)
    else:
        table = manifest.read_manifest_file(source, input_uri, storage_options)
    return ({"rows": table.num_rows, "folders": folders}, *split_by_partition(table, partitions))


def _ledger_task(files: list[str], output_uri: str, digest: str, partitions: int, storage_options):
    """Committed ledger keys of these images files for this weights digest -> (rows, *parts)."""
    import pyarrow.dataset as pads

    from ssd_core import storage

    fs, _ = storage.pyarrow_filesystem_for(output_uri, storage_options)
    dataset = pads.dataset(files, filesystem=fs, format="parquet", schema=ledger.images_schema())
    table = dataset.to_table(columns=ledger.LEDGER_KEY, filter=pads.field("weights_digest") == digest)
    return (table.num_rows, *split_by_partition(table, partitions))


def _anti_join_task(digest: str, num_inputs: int, *parts):
    """One part: distinct inputs not in the ledger -> ((seen, pending), pending rows sorted by image_uri)."""
    import pyarrow as pa

    inputs = pa.concat_tables(parts[:num_inputs]) if num_inputs else None
    if inputs is None or inputs.num_rows == 0:
        return (0, 0), None
    inputs = _distinct_uris(inputs)
    done = pa.concat_tables(parts[num_inputs:]) if len(parts) > num_inputs else ledger.empty_ledger()
    pending = ledger.pending_objects(inputs, done, digest)
    return (inputs.num_rows, pending.num_rows), pending


def _distinct_uris(table):
    """One row per image_uri (a manifest may name an object twice): the first after sorting."""
    import numpy as np

    table = table.sort_by("image_uri")
    uris = table["image_uri"].to_numpy(zero_copy_only=False)
    if len(uris) < 2:
        return table
    keep = np.concatenate([[True], uris[1:] != uris[:-1]])
    return table if keep.all() else table.filter(keep)


def find_pending(input_uri: str | None, output_uri: str, digest: str, *, manifest_uri: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, partitions: int | None = None) -> Pending:
    """Inputs under ``input_uri`` (or named by ``manifest_uri``) not yet in ``output_uri``'s ledger for
    ``digest``, computed by Ray tasks on the connected cluster (see the module docstring).
    ``storage_options`` are passed to the tasks (the S3 endpoint resolved, no secrets from the env)."""
    import ray

    from ssd_core.bulk import manifest

    options = dict(storage_options or {})
    units: list[tuple[str, Any]]
    if manifest_uri is not None:
        files = manifest.manifest_files(manifest_uri, options)
        units = [("manifest", file) for file in files]
        estimate = sum(file.size for file in files) // MANIFEST_BYTES_PER_ROW
    else:
        units = [("top", input_uri)]
        estimate = 0
    ledger_files = ledger.committed_images_files(output_uri, options)
    estimate = max(estimate, len(ledger_files) * 1024)
    if partitions is None:
        partitions = max(2, -(-estimate // ROWS_PER_PARTITION))
    listing_task = ray.remote(num_returns=partitions + 1)(_listing_task)

    input_parts: list[list] = []  # per unit: its `partitions` refs
    summaries = []
    for kind, source in units:
        summary, *parts = listing_task.remote(kind, source, input_uri, partitions, options)
        summaries.append(summary)
        input_parts.append(parts)
    if manifest_uri is None:
        # The top level names the sub-folders; each is listed by its own task.
        (top,) = ray.get(summaries)
        for folder in top["folders"]:
            summary, *parts = listing_task.remote("folder", folder, input_uri, partitions, options)
            input_parts.append(parts)

    ledger_task = ray.remote(num_returns=partitions + 1)(_ledger_task)
    ledger_parts = []
    for start in range(0, len(ledger_files), LEDGER_FILES_PER_TASK):
        _, *parts = ledger_task.remote(ledger_files[start:start + LEDGER_FILES_PER_TASK], output_uri, digest,
                                       partitions, options)
        ledger_parts.append(parts)

    join = ray.remote(num_returns=2)(_anti_join_task)
    counts, tables = [], []
    for p in range(partitions):
        count, table = join.remote(digest, len(input_parts), *(parts[p] for parts in input_parts),
                                   *(parts[p] for parts in ledger_parts))
        counts.append(count)
        tables.append(table)
    del input_parts, ledger_parts  # the joins hold what they need
    pending = Pending()
    for (seen, rows), table in zip(ray.get(counts), tables):
        pending.num_seen += seen
        pending.num_rows += rows
        if rows:
            pending.refs.append(table)
            pending.part_rows.append(rows)
    return pending
