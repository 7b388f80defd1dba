"""ssd-pipeline: the SSD detector family, training, COCO evaluation, prediction and Ray engines.

Public entry points are imported lazily so that `import ssd_core` stays cheap (no torch at import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_model", "load_model", "list_models"]
__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from ssd_core.zoo import build_model, list_models, load_model


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ssd_core import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'ssd_core' has no attribute {name!r}")
