"""S3 access: one object per key, written once (If-None-Match: *), first writer wins."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .errors import SdfarmError, TransientError
from .settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CONFLICT_RETRIES = 5


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class Store:
    """The bucket. Every method raises TransientError when S3 cannot be reached after retries."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret,
            config=Config(
                retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
            ),
        )
        return cls(client, settings.s3_bucket)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            if _status(e) >= 500 or _code(e) in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
                raise TransientError(f"S3 {what} failed: {e}") from e
            raise
        except BotoCoreError as e:  # connection refused, timeouts, after botocore's own retries
            raise TransientError(f"S3 {what} failed: {e}") from e

    def ensure_bucket(self) -> None:
        try:
            self._call("head bucket", self.client.head_bucket)
        except ClientError as e:
            if _status(e) != 404:
                raise
            self._call("create bucket", self.client.create_bucket)

    def put_if_absent(self, key: str, body: bytes, content_type: str) -> bool:
        """Write key unless it exists. True: this call wrote it; False: it was already there (412).

        A 409 means another writer is mid-upload of the same key: wait, retry, expect 412.
        """
        for attempt in range(_CONFLICT_RETRIES):
            try:
                self._call("put " + key, self.client.put_object, Key=key, Body=body,
                           ContentType=content_type, IfNoneMatch="*")
                return True
            except ClientError as e:
                if _status(e) == 412 or _code(e) == "PreconditionFailed":
                    return False
                if _status(e) == 409 or _code(e) == "ConditionalRequestConflict":
                    time.sleep(0.2 * 2**attempt)
                    continue
                raise
        raise TransientError(f"S3 put {key}: still conflicting after {_CONFLICT_RETRIES} tries")

    def put_json_if_absent(self, key: str, data: Any) -> bool:
        return self.put_if_absent(key, json.dumps(data, ensure_ascii=False, indent=1).encode(), "application/json")

    def put_json(self, key: str, data: Any) -> None:
        """Overwrite: for records that may change (failure reasons), never for outputs."""
        body = json.dumps(data, ensure_ascii=False, indent=1).encode()
        self._call("put " + key, self.client.put_object, Key=key, Body=body, ContentType="application/json")

    def exists(self, key: str) -> bool:
        try:
            self._call("head " + key, self.client.head_object, Key=key)
            return True
        except ClientError as e:
            if _status(e) == 404 or _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def get(self, key: str) -> bytes:
        try:
            response = self._call("get " + key, self.client.get_object, Key=key)
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404") or _status(e) == 404:
                raise MissingObject(f"s3://{self.bucket}/{key} does not exist") from e
            raise
        data: bytes = response["Body"].read()
        return data

    def download(self, key: str, path: Path) -> None:
        """Stream an object to a local file (large weights files); MissingObject when absent."""
        try:
            self._call("download " + key, lambda **kw: self.client.download_file(kw["Bucket"], key, str(path)))
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404") or _status(e) == 404:
                raise MissingObject(f"s3://{self.bucket}/{key} does not exist") from e
            raise

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def keys(self, prefix: str) -> Iterator[str]:
        token: dict[str, str] = {}
        while True:
            page = self._call("list " + prefix, self.client.list_objects_v2, Prefix=prefix, **token)
            for obj in page.get("Contents", []):
                yield obj["Key"]
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, key: str) -> None:
        """For records only (failure reasons); outputs are never deleted or overwritten."""
        self._call("delete " + key, self.client.delete_object, Key=key)

    def presigned_get(self, key: str, expires_s: int = 3600) -> str:
        """A short-lived read-only link. Never hand out presigned PUTs: they could overwrite."""
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=min(expires_s, 7 * 24 * 3600)
        )
        return url


class MissingObject(SdfarmError):
    """An object that should exist does not."""
