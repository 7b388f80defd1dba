"""Shared S3 fixtures: a real moto S3 server on 127.0.0.1 (ThreadedMotoServer) with a free port.

Import the fixtures into a test module (``from s3_server import moto_s3, s3_bucket  # noqa: F401``)
until they move into tests/conftest.py. ``moto_s3`` sets the standard AWS environment
(``AWS_ENDPOINT_URL``, dummy keys, region) for the whole session, so every library under test has to
find the endpoint the way it would in production.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

FAKE_KEY_ID = "testing-key-id-AKIA"
FAKE_SECRET = "testing-secret-do-not-leak-9f8e7d"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """Endpoint URL of a moto S3 server; the AWS environment points at it for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=FAKE_KEY_ID,
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(moto_s3: str) -> str:
    """A fresh empty bucket name on the moto server (created with boto3, independent of our code)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(moto_s3: str):
    """A small local Ray cluster started after the AWS environment is set, so its workers inherit it."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()
