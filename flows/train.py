"""`train-ssd`: Ray-distributed training of an SSD (``ssd_core.distributed.fit_distributed``).

The flow only assembles a ``TrainConfig`` and publishes what the run produced: the final metrics as
a table artifact, the run folder as a link artifact. Training is not retried by Prefect: a failed
worker is replaced by Ray (``max_failures``, Ray's FailureConfig), resuming from the last checkpoint,
and running the flow again on the same ``output`` continues the run (``resume``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import publish_link, publish_table, scalar_rows

DEFAULT_ARCH = "ssdlite320_mobilenet_v3_large"


def train_config(*, arch: str, data: str, output: str, epochs: int, batch_size: int, resume: bool,
                 size: list[int] | None = None, weights: str | None = None, weights_backbone: str | None = "DEFAULT",
                 trainable_backbone_layers: int | None = None, options: dict[str, Any] | None = None):
    """A TrainConfig from the flow's parameters; ``options`` holds any other TrainConfig field
    (``lr``, ``precision``, ``time_budget_s``, ``max_steps_per_epoch``, ``workers`` for loader
    processes...). ``size`` ([H, W] or [S]) overrides the model's input size."""
    from ssd_core.train_config import TrainConfig

    values: dict[str, Any] = {**(options or {}), "arch": arch, "data": data, "output": output,
                              "epochs": epochs, "batch_size": batch_size, "resume": resume, "weights": weights,
                              "weights_backbone": weights_backbone,
                              "trainable_backbone_layers": trainable_backbone_layers}
    if size:
        values["model"] = {**values.get("model", {}), "size": list(size) * (2 if len(size) == 1 else 1)}
    return TrainConfig.from_dict(values)


# No retries: a failing run is either a user error (fails again) or a worker loss, which Ray's
# FailureConfig already recovers from inside fit_distributed.
@task(retries=0)
def run_training(config_dict: dict[str, Any], workers: int, gpu: bool, cpus_per_worker: int | None,
                 max_failures: int) -> dict[str, Any]:
    from ssd_core.distributed import fit_distributed
    from ssd_core.train_config import TrainConfig

    resources = {"CPU": cpus_per_worker} if cpus_per_worker else None
    return fit_distributed(TrainConfig.from_dict(config_dict), num_workers=workers, use_gpu=gpu,
                           resources_per_worker=resources, max_failures=max_failures)


@flow(name="train-ssd", log_prints=True)
def train_ssd(data: str, output: str, arch: str = DEFAULT_ARCH, epochs: int = 10, batch_size: int = 16,
              workers: int = 1, gpu: bool = False, resume: bool = False, size: list[int] | None = None,
              cpus_per_worker: int | None = None, max_failures: int = 2, weights: str | None = None,
              weights_backbone: str | None = "DEFAULT", trainable_backbone_layers: int | None = None,
              options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``arch`` on the COCO-format dataset ``data`` (folder or s3://) into ``output`` (RUN_DIR,
    folder or s3://) on ``workers`` Ray workers (one GPU each with ``gpu``), ``batch_size`` images per
    worker and step. ``weights`` fine-tunes a detector (registry name such as "DEFAULT", path or URL;
    ``ssd weights list``); without it ``weights_backbone`` ("DEFAULT": the ImageNet backbone, "none":
    from scratch) starts the backbone. Returns the final metrics; RUN_DIR/last.pt is the checkpoint.
    """
    from ssd_core.evaluation import METRIC_NAMES

    logger = get_run_logger()
    config = train_config(arch=arch, data=data, output=output, epochs=epochs, batch_size=batch_size,
                          resume=resume, size=size, weights=weights, weights_backbone=weights_backbone,
                          trainable_backbone_layers=trainable_backbone_layers, options=options)
    config.resolved(workers)  # configuration errors fail the flow before Ray starts
    result = run_training(config.to_dict(), workers, gpu, cpus_per_worker, max_failures)

    summary = {key: value for key, value in result.items() if key != "per_class_AP"}
    publish_table("train-ssd-metrics", scalar_rows(summary, METRIC_NAMES),
                  f"{arch} on {data}: final COCO metrics and training counters")
    publish_link("train-ssd-run", output, f"run folder {output}",
                 f"checkpoint {result.get('checkpoint')}, metrics.jsonl, curves.png, config.json")
    logger.info("trained %s: AP %s, AP50 %s after %s steps; checkpoint %s", arch, result.get("AP"),
                result.get("AP50"), result.get("step"), result.get("checkpoint"))
    return summary
