"""The embedded stack is the real thing: Redis with a password, S3 with credentials and If-None-Match."""

from __future__ import annotations

import boto3
import pytest
import redis
from botocore.exceptions import ClientError

from infra.stack import StackInfo
from sdfarm.store import Store


def test_redis_requires_the_password(stack_info: StackInfo) -> None:
    anonymous = redis.Redis(port=stack_info.redis_port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    assert redis.Redis.from_url(stack_info.redis_url).ping()


def test_redis_runs_with_aof_and_noeviction(stack_info: StackInfo) -> None:
    config = redis.Redis.from_url(stack_info.redis_url).config_get("*")
    assert config["appendonly"] == "yes"
    assert config["maxmemory-policy"] == "noeviction"


def test_s3_rejects_wrong_credentials(stack_info: StackInfo) -> None:
    client = boto3.client("s3", endpoint_url=stack_info.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=stack_info.s3_access_key, aws_secret_access_key="wrong")
    with pytest.raises(ClientError, match=r"SignatureDoesNotMatch|AccessDenied"):
        client.list_objects_v2(Bucket=stack_info.bucket)


def test_put_if_absent_first_writer_wins(store: Store) -> None:
    key = "tests/put-if-absent"
    assert store.put_if_absent(key, b"first", "text/plain") is True
    assert store.put_if_absent(key, b"second", "text/plain") is False
    assert store.get(key) == b"first"
