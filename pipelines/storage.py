"""Local paths or s3:// behind one interface (pyarrow.fs), and atomic stage commits.

A stage's output is a directory; it is valid only once its ``_manifest.json`` exists, and readers use
only the files the manifest lists. Committing = writing the manifest last, in one atomic write
(local: temp file + rename; S3: one PUT). A stage that died leaves no manifest and is redone.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "_manifest.json"


@dataclass
class Storage:
    """A root URI (a local directory or s3://bucket/prefix) and the pyarrow filesystem that serves it."""

    root_uri: str
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    driver_io_mb: float = 256.0  # splits up to this size are read (and written) without Ray Data tasks
    # A scoped store (``scoped``): every path lives under <root>/<scope>, except those whose first part is one
    # of ``shared`` (read from the root, e.g. the run's ingest): a training-knob trial writes its own train and
    # precompute stages while reading the run's data
    scope: str = ""
    shared: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.root_uri.startswith("s3://"):
            kw: dict[str, Any] = {"region": self.s3_region, "retry_strategy":
                                  pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
            if self.s3_endpoint:
                scheme, _, host = self.s3_endpoint.partition("://")
                kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if key and secret:
                kw.update(access_key=key, secret_key=secret,
                          session_token=os.environ.get("AWS_SESSION_TOKEN"))
            self.fs: pafs.FileSystem = pafs.S3FileSystem(**kw)
            self._base = self.root_uri[len("s3://"):].rstrip("/")
            self._check_bucket()
        else:
            self.fs = pafs.LocalFileSystem()
            self._base = str(Path(self.root_uri).resolve())
            self.root_uri = self._base

    def args(self) -> list:
        """What ``Storage(*args)`` rebuilds this store from in another process (Ray workers and actors)."""
        return [self.root_uri, self.s3_endpoint, self.s3_region, self.driver_io_mb, self.scope, tuple(self.shared)]

    def scoped(self, scope: str, shared: tuple[str, ...] = ("ingest",)) -> Storage:
        """This store seen from ``<root>/<scope>``: paths starting with a part of ``shared`` still resolve at
        the root (a trial reads the run's ingest and writes everything else under its own folder)."""
        inner = f"{self.scope}/{scope.strip('/')}" if self.scope else scope.strip("/")
        return Storage(self.root_uri, self.s3_endpoint, self.s3_region, self.driver_io_mb, inner, tuple(shared))

    def in_driver(self, nbytes: int) -> bool:
        """Whether data of ``nbytes`` are read/written by the driver with pyarrow (``driver_io_mb``)."""
        return nbytes <= self.driver_io_mb * 2**20

    @property
    def bucket(self) -> str:
        return self._base.split("/", 1)[0] if self.is_s3 else ""

    def _where(self) -> str:
        return f"endpoint {self.s3_endpoint}" if self.s3_endpoint else f"AWS S3 region {self.s3_region}"

    def _check_bucket(self) -> None:
        """Fail before any work if the bucket is missing or unreachable (boto3 HeadBucket, a few seconds
        at most; pyarrow would only fail at the first write, after ingest has done its work)."""
        import boto3
        import botocore.exceptions as bex
        from botocore import UNSIGNED
        from botocore.config import Config as BotoConfig

        bucket = self.bucket
        if not bucket:
            raise ValueError(f"storage.uri {self.root_uri!r} names no bucket: expected s3://bucket/prefix")
        conf = dict(region_name=self.s3_region, connect_timeout=5, read_timeout=10,
                    retries={"max_attempts": 2, "mode": "standard"})

        def head(**extra: Any) -> None:
            boto3.session.Session().client(
                "s3", endpoint_url=self.s3_endpoint or None, region_name=self.s3_region,
                config=BotoConfig(**conf, **extra)).head_bucket(Bucket=bucket)

        try:
            try:
                head()
            except bex.NoCredentialsError:  # pyarrow goes anonymous without credentials: do the same
                head(signature_version=UNSIGNED)
        except bex.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise ValueError(f"S3 bucket s3://{bucket} does not exist ({self._where()}); create it or "
                                 f"fix storage.uri={self.root_uri!r}") from None
            if code in ("403", "AccessDenied"):
                raise ValueError(f"S3 bucket s3://{bucket}: access denied ({self._where()}); check the AWS "
                                 "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance role) "
                                 "on this machine and on every Ray node") from None
            raise ValueError(f"S3 bucket s3://{bucket} cannot be checked ({self._where()}): {e}") from None
        except bex.BotoCoreError as e:  # endpoint unreachable, bad endpoint URL, ...
            raise ConnectionError(f"S3 bucket s3://{bucket} cannot be reached ({self._where()}): {e}") from None

    @property
    def is_s3(self) -> bool:
        return self.root_uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        """A path for ``self.fs`` (no scheme)."""
        rel = [p.strip("/") for p in parts if p]
        if self.scope and not (rel and rel[0].split("/", 1)[0] in self.shared):
            rel = [self.scope, *rel]
        return "/".join([self._base, *rel])

    def uri(self, *parts: str) -> str:
        """A full URI (s3://... or an absolute local path) for tools that take URIs."""
        p = self.path(*parts)
        return f"s3://{p}" if self.is_s3 else p

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole object atomically (S3: one PUT; local: temp file then rename)."""
        target = self.path(*parts)
        if self.is_s3:
            try:
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
            except OSError as e:  # name the object and the endpoint (pyarrow names only the key)
                raise OSError(f"cannot write {self.uri(*parts)} ({self._where()}): {e}") from e
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def remove_dir(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_dir(self.path(*parts))

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Files under a directory (recursive), as fs paths, sorted."""
        if not self.exists(*parts):
            return []
        sel = pafs.FileSelector(self.path(*parts), recursive=True)
        return sorted(i.path for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def mkdir(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)


def from_config(cfg: Any) -> Storage:
    """Storage for a pipeline Config's ``storage`` section, rooted at <uri>/<run name>; a relative local
    uri is relative to the current directory (where the user runs, also for an installed package)."""
    uri = cfg.storage.uri
    if not uri.startswith("s3://") and not os.path.isabs(uri):
        uri = str(Path.cwd() / uri)
    return Storage(f"{uri.rstrip('/')}/{cfg.name}", cfg.storage.s3_endpoint, cfg.storage.s3_region,
                   cfg.storage.driver_io_mb)


def committed(store: Storage, stage: str, config_hash: str) -> dict | None:
    """The stage's manifest if it was committed for the same config hash, else None."""
    if not store.exists(stage, MANIFEST):
        return None
    manifest = store.read_json(stage, MANIFEST)
    return manifest if manifest.get("config_hash") == config_hash else None


def begin(store: Storage, stage: str) -> None:
    """Start (or restart) a stage: drop any manifest first, then leftovers of a dead attempt."""
    if store.exists(stage, MANIFEST):
        store.fs.delete_file(store.path(stage, MANIFEST))
    store.remove_dir(stage)
    store.mkdir(stage)


def commit(store: Storage, stage: str, config_hash: str, **fields: Any) -> dict:
    """Write the stage's manifest last: from this moment the stage counts as done."""
    manifest = {"stage": stage, "config_hash": config_hash, "committed_at": time.time(), **fields}
    store.write_json(manifest, stage, MANIFEST)
    return manifest
