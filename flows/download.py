"""`download-coco`: COCO 2017 into the project's dataset layout (`ssd_core.data.download` does the work;
the tasks add Prefect's retries and logging)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

from ssd_core import storage
from ssd_core.data import download


def is_transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry network and storage errors; bugs and unsafe archives fail at once."""
    try:
        state.result()
    except Exception as exc:
        return download.is_transient(exc)
    return False


@task(retries=6, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5,
      retry_condition_fn=is_transient, task_run_name="fetch {archive.name}")
def fetch_archive(url: str, archive: download.RemoteArchive, folder: str) -> dict[str, Any]:
    """Download one archive (resumes its .part file on every retry)."""
    return download.fetch_archive(url, archive, folder)


# No retries: extraction is deterministic; a corrupt archive fails its checksum before it gets here.
@task
def extract_archive(archive_path: str, target: str) -> list[str]:
    return download.extract_coco_archive(archive_path, target)


@task(retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.5,
      retry_condition_fn=is_transient)
def upload_files(local_dir: str, files: list[str], output: str) -> int:
    return storage.upload_files(local_dir, files, output)


@flow(name="download-coco", log_prints=True)
def download_coco(output: str = "data/coco", splits: list[str] = ["train", "val"],  # noqa: B006
                  base_url: str = download.COCO_BASE_URL, staging_dir: str | None = None,
                  keep_archives: bool = False) -> str:
    """Download COCO 2017 ``splits`` and the instance annotations into ``output`` (folder or s3://),
    resuming interrupted transfers and skipping archives already done."""
    return download.download_coco(
        output, splits, base_url=base_url, staging_dir=staging_dir, keep_archives=keep_archives,
        fetch=fetch_archive, extract=extract_archive, upload=upload_files, info=get_run_logger().info,
    )
