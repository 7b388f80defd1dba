"""Prefect flows that orchestrate ssd_core: download-coco, train-ssd, evaluate-ssd, detect-bucket, and the demo.

The work stays in ssd_core (which never imports Prefect); a flow assembles parameters, calls it from
thin tasks with the retries that help, and publishes artifacts. See prefect.yaml for the deployments.
"""
