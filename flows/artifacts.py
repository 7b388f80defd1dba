"""Turning results into Prefect artifacts (tables, links, markdown) the same way in every flow."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def scalar_rows(values: Mapping[str, Any], order: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``{"name": value}`` -> ``[{"name", "value"}]`` for the scalar entries (numbers, strings, None),
    ``order``'s keys first. Nested values (per-class AP, lists) are left out of a table."""
    order = [key for key in order if key in values]
    rest = sorted(key for key in values if key not in order)
    rows = []
    for key in [*order, *rest]:
        value = values[key]
        if isinstance(value, int | float | str | bool) or value is None:
            rows.append({"name": key, "value": round(value, 4) if isinstance(value, float) else value})
    return rows


def location_link(uri: str) -> str:
    """A link for a local path (file:// URL) or an object-store URI (kept as it is)."""
    return uri if "://" in uri else "file://" + os.path.abspath(uri)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    create_table_artifact(key=key, table=rows, description=description)


def publish_link(key: str, uri: str, text: str, description: str) -> None:
    create_link_artifact(key=key, link=location_link(uri), link_text=text, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    create_markdown_artifact(key=key, markdown=markdown, description=description)
