"""How annotators' browsers reach an image: a Local Storage URL, the http(s) URL itself, or a presigned
S3 URL (SigV4 query signing by hand: boto3 is not among the project's dependencies)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from flywheel.config import Settings, StorageSettings
from flywheel.errors import ConfigError, DataError
from flywheel.labelstudio.client import SERVICE

log = logging.getLogger(__name__)
REMOTE = ("http", "https")
_UNRESERVED = "-_.~"


def is_local(location: str) -> bool:
    return urlparse(location).scheme in ("", "file")


def _local_path(location: str) -> str:
    parsed = urlparse(location)
    return unquote(parsed.path) if parsed.scheme == "file" else location


def image_url(location: str, settings: Settings, *, now: datetime | None = None) -> str:
    """The URL Label Studio shows for an image: local files through Local Storage (relative to the document
    root, quoted), http(s) as given, s3:// presigned with the storage settings."""
    scheme = urlparse(location).scheme
    if scheme in REMOTE:
        return location
    if scheme == "s3":
        return presign_s3(location, settings.storage, now=now)
    if scheme not in ("", "file"):
        raise DataError(
            f"image {location!r}: unsupported URI scheme {scheme!r} (use a path, file://, http(s)://, s3://)"
        )
    _, relative = _under_root(_local_path(location), settings, "image")
    return f"/data/local-files/?d={quote(relative, safe='/')}"


def presign_s3(uri: str, storage: StorageSettings, *, now: datetime | None = None) -> str:
    """A GET URL for s3://bucket/key valid for storage.presign_expiry_s (AWS Signature Version 4, query form).

    Works with AWS and S3-compatible servers (MinIO, Ceph) at storage.endpoint, path- or virtual-host style.
    """
    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise DataError(f"S3 URI {uri!r} needs a bucket and a key: s3://<bucket>/<key>")
    access, secret = storage.access_key.get_secret_value(), storage.secret_key.get_secret_value()
    if not access or not secret:
        raise ConfigError(
            f"{uri} needs S3 credentials: set storage.access_key and storage.secret_key "
            "(FLYWHEEL_STORAGE__ACCESS_KEY, FLYWHEEL_STORAGE__SECRET_KEY)"
        )
    endpoint = urlparse(storage.endpoint or f"https://s3.{storage.region}.amazonaws.com")
    if endpoint.scheme not in REMOTE or not endpoint.netloc:
        raise ConfigError(f"storage.endpoint {storage.endpoint!r} must be an http(s) URL, e.g. http://127.0.0.1:9000")
    virtual = storage.addressing == "virtual"
    host = f"{bucket}.{endpoint.netloc}" if virtual else endpoint.netloc
    path = quote(f"/{key}" if virtual else f"/{bucket}/{key}", safe="/" + _UNRESERVED)
    when = (now or datetime.now(UTC)).astimezone(UTC)
    stamp, day = when.strftime("%Y%m%dT%H%M%SZ"), when.strftime("%Y%m%d")
    scope = f"{day}/{storage.region}/s3/aws4_request"
    params = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{access}/{scope}",
        "X-Amz-Date": stamp,
        "X-Amz-Expires": str(storage.presign_expiry_s),
        "X-Amz-SignedHeaders": "host",
    }
    query = "&".join(f"{quote(k, safe=_UNRESERVED)}={quote(v, safe=_UNRESERVED)}" for k, v in sorted(params.items()))
    canonical = f"GET\n{path}\n{query}\nhost:{host}\n\nhost\nUNSIGNED-PAYLOAD"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signing_key = f"AWS4{secret}".encode()
    for part in (day, storage.region, "s3", "aws4_request"):
        signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{endpoint.scheme}://{host}{path}?{query}&X-Amz-Signature={signature}"


# --- Local Storage -------------------------------------------------------------------------------
def _document_root(settings: Settings) -> str:
    return os.path.normpath(settings.label_studio.document_root.expanduser().absolute())


def _under_root(path: str | Path, settings: Settings, what: str) -> tuple[str, str]:
    """(normalised absolute path, its path relative to the document root), or an error naming both.

    String operations, not pathlib: a push of 10,000 tasks calls this 20,000 times.
    """
    if not os.path.isabs(path):
        raise DataError(f"{what} {str(path)!r} is not an absolute path; Label Studio serves absolute paths only")
    absolute = os.path.normpath(path)
    root = _document_root(settings)
    prefix = root if root.endswith(os.sep) else root + os.sep
    if not absolute.startswith(prefix) or absolute == root:
        raise ConfigError(
            f"{what} {absolute!r} is not below the Label Studio document root {root!r} "
            "(label_studio.document_root, FLYWHEEL_LABEL_STUDIO__DOCUMENT_ROOT, which must match "
            "the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)"
        )
    return absolute, absolute[len(prefix) :]


def _storage_paths(client: LabelStudio, project_id: int) -> set[Path]:
    return {Path(os.path.normpath(s.path)) for s in client.import_storage.local.list(project=project_id) if s.path}


def ensure_local_storage(client: LabelStudio, project_id: int, folder: Path, settings: Settings) -> None:
    """Let Label Studio serve the files below `folder` (a Local Storage on the project, once per folder).

    The storage is never synced: tasks come only from flywheel's pushes.
    """
    absolute = Path(_under_root(folder, settings, "image folder")[0])
    if absolute in _storage_paths(client, project_id):
        return
    _create_storage(client, project_id, absolute)


def _create_storage(client: LabelStudio, project_id: int, folder: Path) -> None:
    try:
        client.import_storage.local.create(
            project=project_id,
            path=str(folder),
            use_blob_urls=True,
            title=f"flywheel: {folder}"[:250],
            description="serves flywheel's images; never synced (tasks are pushed by flywheel)",
        )
    except ApiError as exc:
        raise ConfigError(
            f"{SERVICE} refused a Local Storage for {str(folder)!r} (HTTP {exc.status_code}: {exc.body}); "
            "the folder must exist on the server's machine below its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
        ) from exc
    log.info("Label Studio project %s now serves files below %s", project_id, folder)


def ensure_storages_for(client: LabelStudio, project_id: int, locations: Iterable[str], settings: Settings) -> None:
    """One storage per parent folder of the local images not already covered by a storage of the project."""
    parents = {
        Path(os.path.dirname(_under_root(_local_path(p), settings, "image")[0])) for p in locations if is_local(p)
    }
    if not parents:
        return
    known = _storage_paths(client, project_id)
    for parent in sorted(parents):
        if not any(parent == k or k in parent.parents for k in known):
            _create_storage(client, project_id, parent)
            known.add(parent)
