"""`evaluate-ssd`: the COCO evaluation report of a checkpoint on a dataset (``ssd_core.evaluation``).

Writes REPORT_DIR/metrics.json, results.json, report.md, pr_curves.png and samples.png (a local
folder or s3://, ``evaluation.write_report``), and publishes the report as a markdown artifact and the
12 COCO metrics as a table artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import publish_markdown, publish_table, scalar_rows


def write_coco_report(weights: str, data: str, output: str, *, split: str = "val", batch_size: int = 8,
                      workers: int = 2, precision: str | None = None, max_images: int | None = None,
                      samples: int = 8) -> dict[str, Any]:
    """Evaluate ``weights`` on ``data``/``split`` and write the report into ``output`` (folder or s3://).

    Returns the scalar metrics plus ``report`` (the report.md URI) and ``markdown`` (its text).
    """
    from ssd_core import evaluation, load_model, storage
    from ssd_core.data import CocoDataset

    if not storage.exists(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    model = load_model(weights, precision=precision)
    dataset = CocoDataset(data, split=split)
    metrics = evaluation.evaluate_model(model, dataset, batch_size=batch_size, workers=workers,
                                        max_images=max_images)
    report = evaluation.write_report(metrics, output, dataset=dataset, sample_images=samples)
    markdown = storage.read_bytes(report).decode()
    scalars = {name: metrics.get(name) for name in evaluation.METRIC_NAMES}
    return {**scalars, "num_images": metrics.get("num_images"), "num_detections": metrics.get("num_detections"),
            "report": str(report), "markdown": markdown}


@task(retries=0)
def run_evaluation(weights: str, data: str, output: str, split: str, batch_size: int, workers: int,
                   precision: str | None, max_images: int | None, samples: int) -> dict[str, Any]:
    return write_coco_report(weights, data, output, split=split, batch_size=batch_size, workers=workers,
                             precision=precision, max_images=max_images, samples=samples)


@flow(name="evaluate-ssd", log_prints=True)
def evaluate_ssd(weights: str, data: str, output: str, split: str = "val", batch_size: int = 8,
                 workers: int = 2, precision: str | None = None, max_images: int | None = None,
                 samples: int = 8) -> dict[str, Any]:
    """COCO report of the checkpoint ``weights`` (e.g. RUN_DIR/last.pt) on ``data`` (split ``split``)
    into ``output`` (REPORT_DIR). Returns the 12 metrics and the report's location."""
    from ssd_core.evaluation import METRIC_NAMES

    logger = get_run_logger()
    result = run_evaluation(weights, data, output, split, batch_size, workers, precision, max_images, samples)
    markdown = result.pop("markdown")
    publish_markdown("evaluate-ssd-report", f"{markdown}\nReport folder: `{output}`\n",
                     f"COCO report of {weights} on {data} ({split})")
    publish_table("evaluate-ssd-metrics", scalar_rows(result, METRIC_NAMES),
                  f"COCO metrics of {weights} on {data} ({split})")
    logger.info("AP %s, AP50 %s on %s images; report %s", result["AP"], result["AP50"], result["num_images"],
                result["report"])
    return result
