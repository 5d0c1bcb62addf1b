"""A local S3-compatible server for the object-storage tests: moto's server mode on loopback,
the AWS_* environment pointed at it (credentials, endpoint), never the internet."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REGION = "us-east-1"
_AWS_ENV_CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@contextlib.contextmanager
def moto_s3(scratch: Path) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port) and point s3fs/botocore at it through
    the environment, as a user would (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); the local
    work folders of URL data roots go under `scratch` (MERFLOW_CACHE_DIR). Yields the endpoint."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_ENV_CLEARED:
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "merflow-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "merflow-test-secret")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", str(scratch / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "no-aws-credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("MERFLOW_CACHE_DIR", str(scratch / "merflow-cache"))
        # s3fs caches filesystem objects (and their endpoint) per process: start clean.
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def new_bucket(endpoint: str) -> str:
    """A fresh, empty bucket on the server (one per test keeps tests independent)."""
    import boto3

    name = f"merflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=name)
    return name
