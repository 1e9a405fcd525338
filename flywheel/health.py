"""One reachability check for every server flywheel talks to, so all of them fail the same clear way."""

from __future__ import annotations

import httpx

from flywheel.errors import ServiceUnavailableError


def require_healthy(service: str, base_url: str, *, path: str = "/health", timeout: float = 5.0) -> None:
    """Raise ServiceUnavailableError naming `base_url` unless GET `base_url + path` answers HTTP 200."""
    try:
        response = httpx.get(f"{base_url}{path}", timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(service, base_url, f"{type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise ServiceUnavailableError(service, base_url, f"GET {path} answered HTTP {response.status_code}")
