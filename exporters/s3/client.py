"""Connecting to S3 or an S3-compatible store, and telling its failures apart.

Shared by the exporter and `meterline replay`. Credentials come from boto3's default
chain (environment, shared config and credentials files, SSO, container and instance
roles) unless given explicitly. boto3's own retries are kept short: the exporter's
delivery loop retries a failed batch with backoff, and a batch is one unit of retry.
"""

from __future__ import annotations

from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from meterline.component import PermanentError, RetryableError
from meterline.exporters.s3.config import S3ExporterConfig


def make_client(config: S3ExporterConfig) -> Any:
    """A boto3 S3 client (thread-safe: uploads run in threads)."""
    keys = config.credentials
    session = boto3.session.Session(
        profile_name=config.profile,
        aws_access_key_id=keys.access_key_id if keys else None,
        aws_secret_access_key=keys.secret_access_key if keys else None,
        aws_session_token=keys.session_token if keys else None)
    return session.client("s3", endpoint_url=config.endpoint, region_name=config.region,
                          config=botocore.config.Config(
                              s3={"addressing_style": "path" if config.path_style else "auto"},
                              connect_timeout=float(config.timeout),
                              read_timeout=float(config.timeout),
                              retries={"mode": "standard", "max_attempts": 2}))


# What the store answers that no retry can change: the bucket or the rights are wrong.
_PERMANENT = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied: the credentials may not write there",
    "AllAccessDisabled": "all access to the bucket is disabled",
    "InvalidAccessKeyId": "the access key id is unknown to the store",
    "SignatureDoesNotMatch": "the secret access key is wrong",
    "InvalidBucketName": "the bucket name is invalid",
    "AuthorizationHeaderMalformed": "the region is wrong for this bucket",
}


def classify(error: Exception, where: str) -> Exception:
    """The delivery loop's view of a boto3 failure at `where` (bucket/key): throttling,
    5xx, timeouts and connection failures are retryable; a missing bucket, denied access,
    wrong keys and other 4xx answers are permanent, with a message saying which."""
    if isinstance(error, botocore.exceptions.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _PERMANENT:
            return PermanentError(f"s3://{where}: {_PERMANENT[code]} ({code})")
        if status >= 500 or status in (408, 429) or code in (
                "SlowDown", "Throttling", "RequestTimeout", "ExpiredToken"):
            return RetryableError(f"s3://{where}: {code or status}: {error}")
        return PermanentError(f"s3://{where}: refused ({code or status}): {error}")
    if isinstance(error, botocore.exceptions.NoCredentialsError |
                  botocore.exceptions.ProfileNotFound):
        return PermanentError(f"s3://{where}: {error} (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, a profile, or credentials)")
    return RetryableError(f"s3://{where}: {error}")
