"""A Prefect pull step for deployments of this project (see prefect.yaml).

Prefect's own ``set_working_directory`` needs the directory written into the deployment, which is a
host path on a laptop and ``/app`` in the container image. This step finds the project where the
flow run happens instead: the folder that holds the installed ``flows`` package (the repository for
``pip install -e``, the image's copy in a container), unless SSD_PROJECT_DIR names another one.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_directory() -> Path:
    """SSD_PROJECT_DIR if set, else the directory containing the ``flows`` package."""
    configured = os.environ.get("SSD_PROJECT_DIR", "").strip()
    return Path(configured) if configured else Path(__file__).resolve().parent.parent


def set_project_directory() -> dict[str, str]:
    """Pull step: make the project directory the working directory, so the deployments' entrypoints
    (``flows/<name>.py:<flow>``) resolve. Returns ``{"directory": ...}`` like ``set_working_directory``."""
    directory = project_directory()
    if not (directory / "flows").is_dir():
        raise FileNotFoundError(f"no flows/ folder in the project directory {directory} (set SSD_PROJECT_DIR)")
    os.chdir(directory)
    return {"directory": str(directory)}
