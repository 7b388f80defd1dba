"""The one way this project starts or joins a Ray cluster, used by distributed training and bulk detection."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["init_ray", "NodeResources", "cluster_nodes"]


def init_ray(num_cpus: int | None = None, *, dashboard: bool = False) -> None:
    """Join the cluster at RAY_ADDRESS, or start a fresh local one; no-op if Ray is already initialised.

    ``num_cpus`` applies to a local cluster only. ``dashboard`` serves the State API on 127.0.0.1 (Ray
    Train's controller polls it; bulk detection does without). Usage stats are off unless asked for.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING)


@dataclass(frozen=True)
class NodeResources:
    """One alive node of the cluster and what it offers (totals, not what is free right now)."""

    node_id: str
    cpus: float
    gpus: float


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the connected cluster, from Ray's view of each node (not the driver's hardware)."""
    import ray

    return [
        NodeResources(node["NodeID"], float(node["Resources"].get("CPU", 0)), float(node["Resources"].get("GPU", 0)))
        for node in ray.nodes()
        if node.get("Alive")
    ]
