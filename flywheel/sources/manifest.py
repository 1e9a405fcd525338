"""CSV and JSONL manifests: one sample per row, a `path` or `uri` field and an optional `label`.

A manifest is input from elsewhere, so it is read defensively. Every error names the file, the line, the
column (CSV: the field's position in the row; JSONL: the character where the field's key starts) and the
field. Every location must resolve inside an allowed root (`Roots`): the manifest's own folder, the
workspace and `settings.allowed_roots`; `../` and symlinks are resolved first, so neither escapes. http(s)
URIs are fetched only below an allowed URL prefix, without following redirects.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from flywheel.atomic import atomic_path
from flywheel.errors import DataError

LOCATION_FIELDS = ("path", "uri")
FETCH_TIMEOUT_S = 30


@dataclass(frozen=True)
class Record:
    path: str  # absolute local path
    label: str | None


@dataclass(frozen=True)
class Roots:
    """Where manifest entries may point: folders (resolved) and http(s) URL prefixes."""

    folders: tuple[Path, ...]
    url_prefixes: tuple[str, ...] = ()

    @classmethod
    def build(cls, allowed: Iterable[str | Path]) -> Roots:
        folders, prefixes = [], []
        for root in allowed:
            text = str(root)
            if urlparse(text).scheme in ("http", "https"):
                prefixes.append(text if text.endswith("/") else text + "/")
            else:
                folders.append(Path(text).expanduser().resolve())
        return cls(tuple(dict.fromkeys(folders)), tuple(dict.fromkeys(prefixes)))

    def describe(self) -> str:
        return ", ".join([*(str(f) for f in self.folders), *self.url_prefixes]) or "none"

    def check_path(self, path: Path, where: str) -> Path:
        """The path with `..` and symlinks resolved, if that lies inside a root folder; else DataError."""
        resolved = path.resolve()
        if not any(resolved.is_relative_to(folder) for folder in self.folders):
            raise DataError(
                f"{where}: {path} resolves to {resolved}, outside the allowed roots ({self.describe()}); "
                "add its folder to allowed_roots (FLYWHEEL_ALLOWED_ROOTS) if it is meant to be read"
            )
        return resolved

    def check_url(self, url: str, where: str) -> None:
        parsed = urlparse(url)
        if parsed.username is not None or parsed.password is not None:
            raise DataError(f"{where}: URL {url} carries credentials; put them in no manifest")
        for prefix in self.url_prefixes:
            allowed = urlparse(prefix)
            path = posixpath.normpath(unquote(parsed.path) or "/")
            if (
                (parsed.scheme, parsed.netloc.lower()) == (allowed.scheme, allowed.netloc.lower())
                and (path + "/").startswith(unquote(allowed.path) or "/")
                and ".." not in unquote(parsed.path).split("/")
            ):
                return
        raise DataError(
            f"{where}: URL {url} is not below an allowed URL prefix ({', '.join(self.url_prefixes) or 'none'}); "
            "add one to allowed_roots (FLYWHEEL_ALLOWED_ROOTS) to fetch from it"
        )


def read_manifest(
    manifest: Path, cache_dir: Path, *, allowed_roots: Sequence[str | Path] = ()
) -> tuple[list[Record], list[str]]:
    """Records (absolute local path, label) and the sorted labels of a .csv or .jsonl manifest.

    Relative paths are resolved against the manifest's folder; http(s) URIs are fetched into `cache_dir`
    (which is an allowed root, as are the manifest's folder and `allowed_roots`).
    """
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    roots = Roots.build([manifest.parent, cache_dir, *allowed_roots])
    records = []
    for line, row, columns in _rows(manifest):
        field = next((f for f in LOCATION_FIELDS if row.get(f) not in (None, "")), None)
        if field is None:
            raise DataError(f"{manifest}:{line}: needs a 'path' or 'uri' field, got fields {sorted(row)}")
        where = f"{manifest}:{line}:{columns[field]}: field {field!r}"
        location = _text(row[field], where)
        label = None
        if row.get("label") not in (None, ""):
            label = _text(row["label"], f"{manifest}:{line}:{columns['label']}: field 'label'")
        records.append(Record(_localize(location, manifest.parent, cache_dir, roots, where), label))
    return records, sorted({r.label for r in records if r.label is not None})


def _text(value: Any, where: str) -> str:
    """A field's value as text: strings as they are, integers (class ids) as digits; anything else refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: expected a string, got {type(value).__name__} {json.dumps(value)[:80]}")


def _decoded(manifest: Path) -> str:
    data = manifest.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{manifest}:{line}:{column}: not UTF-8 ({exc.reason}, byte {data[exc.start]:#04x})") from exc


def _rows(manifest: Path) -> list[tuple[int, dict[str, Any], dict[str, int]]]:
    """(line, field -> value, field -> column) per data row."""
    suffix = manifest.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(manifest, _decoded(manifest))
    if suffix == ".csv":
        return _csv_rows(manifest, _decoded(manifest))
    raise DataError(f"manifest {manifest}: unsupported suffix {manifest.suffix!r} (use .csv or .jsonl)")


def _jsonl_rows(manifest: Path, text: str) -> list[tuple[int, dict[str, Any], dict[str, int]]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest}:{line}:{exc.colno}: invalid JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise DataError(f"{manifest}:{line}:1: expected a JSON object, got {type(row).__name__}")
        columns = {key: raw.find(json.dumps(key)) + 1 for key in row}  # where the key starts
        rows.append((line, row, columns))
    return rows


def _csv_rows(manifest: Path, text: str) -> list[tuple[int, dict[str, Any], dict[str, int]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if not header or not set(LOCATION_FIELDS) & {h.strip() for h in header}:
            raise DataError(f"{manifest}:1:1: the CSV header needs a 'path' or 'uri' column, got {header}")
        names = [h.strip() for h in header]
        repeated = sorted({n for n in names if names.count(n) > 1 and n})
        if repeated:
            raise DataError(f"{manifest}:1:{names.index(repeated[0]) + 1}: column {repeated[0]!r} appears twice")
        columns = {name: i + 1 for i, name in enumerate(names)}
        rows = []
        line = 1
        for values in reader:
            start, line = line + 1, reader.line_num  # a quoted field may span lines: report where the row starts
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(names):
                raise DataError(
                    f"{manifest}:{start}:{min(len(values), len(names)) + 1}: {len(values)} fields, the header has "
                    f"{len(names)} ({', '.join(names)})"
                )
            rows.append((start, dict(zip(names, (v.strip() for v in values), strict=True)), columns))
        return rows
    except csv.Error as exc:
        raise DataError(f"{manifest}:{reader.line_num}: invalid CSV: {exc}") from exc


def _localize(location: str, base: Path, cache_dir: Path, roots: Roots, where: str) -> str:
    """A local, allowed, existing file for a manifest location (fetching http(s) URLs into `cache_dir`)."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        roots.check_url(location, where)
        return str(_fetch(location, cache_dir, where))
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DataError(f"{where}: file URI {location} names host {parsed.netloc!r}; only local files are read")
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "":
        path = Path(location).expanduser()
        path = path if path.is_absolute() else base / path
    else:
        raise DataError(
            f"{where}: unsupported URI scheme {parsed.scheme!r} in {location} (use a path, file:// or http(s)://)"
        )
    resolved = roots.check_path(path, where)
    if not resolved.is_file():
        raise DataError(f"{where}: image {path} does not exist")
    return str(resolved)


def _fetch(url: str, cache_dir: Path, where: str) -> Path:
    target = cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:32] + Path(urlparse(url).path).suffix)
    if target.exists():
        return target
    try:
        response = httpx.get(url, timeout=FETCH_TIMEOUT_S, follow_redirects=False)
        if response.is_redirect:
            raise DataError(
                f"{where}: {url} redirects to {response.headers.get('location')}; give the final URL "
                "(redirects are not followed, so a manifest cannot lead outside the allowed prefixes)"
            )
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise DataError(f"{where}: cannot fetch {url}: {exc}") from exc
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(response.content)
    return target
