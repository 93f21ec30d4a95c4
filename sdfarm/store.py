"""S3 access: one object per key, written once (If-None-Match: *), first writer wins."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from .errors import ConfigError, InvalidInput, SdfarmError, TransientError, brief
from .settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CONFLICT_RETRIES = 5
# what S3 answers when it refuses the credentials themselves, whatever the request
_BAD_SECRET = ("SignatureDoesNotMatch",)
_BAD_KEY_ID = ("InvalidAccessKeyId", "InvalidClientTokenId", "UnrecognizedClientException")


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class Store:
    """The bucket. Every method raises TransientError when S3 cannot be reached after retries."""

    def __init__(self, client: S3Client, bucket: str, access_key_id: str | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.access_key_id = access_key_id  # named when S3 refuses the credentials; never the secret

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        try:
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
                    signature_version="s3v4",  # presigned links too (botocore would presign with SigV2)
                ),
            )
        except ValueError as e:  # botocore: "Invalid endpoint: ..." (a region is not checked here)
            raise ConfigError(f"SDFARM_S3_ENDPOINT_URL {brief(settings.s3_endpoint_url)} is not a URL"
                              " (allowed: http://HOST:PORT or https://HOST)") from e
        return cls(client, settings.s3_bucket, settings.s3_access_key_id)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            if _status(e) >= 500 or _code(e) in ("SlowDown", "RequestTimeout", "ServiceUnavailable"):
                raise TransientError(f"S3 {what} failed: {e}") from e
            if _status(e) == 403:
                raise self._refused(what, _code(e)) from None
            raise
        except NoCredentialsError:
            raise ConfigError("no S3 credentials: set SDFARM_S3_ACCESS_KEY_ID and SDFARM_S3_SECRET_ACCESS_KEY"
                              " (or boto3's AWS_* variables, files or role)") from None
        except BotoCoreError as e:  # connection refused, timeouts, after botocore's own retries
            raise TransientError(f"S3 {what} failed: {e}") from e

    def _refused(self, what: str, code: str) -> ConfigError:
        """Which credential S3 refused (a HEAD answer has no body, so no code: ask again with a GET).
        The secret is never part of the message."""
        if code in ("403", "Forbidden", ""):
            try:
                self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
            except ClientError as e:
                code = _code(e) or code
            except BotoCoreError:
                pass
        key = f"access key id {brief(self.access_key_id)} (SDFARM_S3_ACCESS_KEY_ID)" if self.access_key_id \
            else "the access key from boto3's chain"
        if code in _BAD_SECRET:
            return ConfigError(f"S3 refused {what}: the secret key does not match {key}; check"
                               " SDFARM_S3_SECRET_ACCESS_KEY")
        if code in _BAD_KEY_ID:
            return ConfigError(f"S3 refused {what}: it does not know {key}; check SDFARM_S3_ACCESS_KEY_ID")
        return ConfigError(f"S3 refused {what} ({code or 403}) to {key} in bucket {self.bucket!r}: check"
                           " SDFARM_S3_ACCESS_KEY_ID, SDFARM_S3_SECRET_ACCESS_KEY and that key's permissions")

    def ensure_bucket(self) -> None:
        try:
            self._call("head bucket", self.client.head_bucket)
        except ClientError as e:
            if _status(e) != 404:
                raise
            self._call("create bucket", self.client.create_bucket)

    def put_if_absent(self, key: str, body: bytes | IO[bytes], content_type: str) -> bool:
        """Write key unless it exists. True: this call wrote it; False: it was already there (412).

        `body` may be a seekable binary file, read from where it stands: it is streamed (one PUT,
        as S3 allows up to 5 GiB), so a large object (a million-job jobs.jsonl) is never in memory.
        A 409 means another writer is mid-upload of the same key: wait, retry, expect 412.
        """
        start = body.tell() if not isinstance(body, bytes) else 0
        for attempt in range(_CONFLICT_RETRIES):
            if not isinstance(body, bytes):
                body.seek(start)
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

    def _get_object(self, key: str) -> Any:
        """GetObject's response (its Body not read yet); MissingObject when absent."""
        try:
            return self._call("get " + key, self.client.get_object, Key=key)
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404") or _status(e) == 404:
                raise MissingObject(f"s3://{self.bucket}/{key} does not exist") from e
            raise

    def lines(self, key: str) -> Iterator[bytes]:
        """An object's lines, streamed (a million-job batch's record is never held whole)."""
        body = self._get_object(key)["Body"]
        try:
            yield from body.iter_lines()
        finally:
            body.close()

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """An object's bytes. With max_bytes, a larger object is refused (InvalidInput, "is N bytes
        (allowed: ...)") before its body is read."""
        response = self._get_object(key)
        size = int(response.get("ContentLength", 0))
        if max_bytes is not None and size > max_bytes:
            response["Body"].close()
            raise InvalidInput(f"is {size} bytes (allowed: at most {max_bytes})")
        data: bytes = response["Body"].read() if max_bytes is None else response["Body"].read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidInput(f"is more than {max_bytes} bytes (allowed: at most {max_bytes})")
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
