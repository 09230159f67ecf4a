"""Constants and helpers of the test services (session Ray, moto S3, mlflow server; fixtures in tests/conftest.py)."""

import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Test credentials for the moto S3 endpoint: set in the driver by `moto_s3` and given to every worker of
# the session's Ray (runtime_env) so that workers sign requests as they would against a real S3. Ray
# workers take their environment from Ray's start, not from later os.environ changes in the driver.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
S3_TEST_BUCKET = "xai-test-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bucket_keys(client, bucket: str, prefix: str) -> set[str]:  # noqa: ANN001 - a boto3 client
    """Every object key under ``prefix`` in the bucket, without the prefix."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}
