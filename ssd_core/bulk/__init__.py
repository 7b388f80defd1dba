"""Bulk detection over an image bucket with Ray Data -> Parquet tables (``detections``, ``images``).

- ``listing``: the input objects under a folder or s3:// prefix;
- ``manifest``: the input objects named by a manifest (S3 Inventory, CSV, Parquet, plain list);
- ``pending``: what a run has to process (listing/manifest anti-join ledger, in Ray tasks);
- ``ledger``: the two table schemas, the ledger (exactly-once), the commit protocol, orphan cleanup;
- ``compact``: merging committed small files into large ones (``ssd compact``);
- ``stages``: what runs on the cluster (read/decode, inference actors, block writes);
- ``pipeline``: the driver (``detect_bucket``): what to process, the actor topology, the Ray Data plan.
"""

from ssd_core.bulk.ledger import (
    block_id_of,
    detections_schema,
    images_schema,
    pending_objects,
    read_ledger,
    remove_uncommitted,
    weights_digest,
)
from ssd_core.bulk.listing import list_images
from ssd_core.bulk.pipeline import cpu_block_rows, default_run_id, detect_bucket
from ssd_core.bulk.stages import DetectConfig

__all__ = [
    "DetectConfig",
    "block_id_of",
    "cpu_block_rows",
    "default_run_id",
    "detect_bucket",
    "detections_schema",
    "images_schema",
    "list_images",
    "pending_objects",
    "read_ledger",
    "remove_uncommitted",
    "weights_digest",
]
