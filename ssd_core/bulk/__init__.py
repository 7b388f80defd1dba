"""Bulk detection over an image bucket with Ray Data -> Parquet tables (``detections``, ``images``).

- ``listing``: the input objects under a folder or s3:// prefix;
- ``ledger``: the two table schemas, the ledger (exactly-once), the commit protocol, orphan cleanup;
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
