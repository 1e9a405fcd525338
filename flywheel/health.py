"""One reachability check for every server flywheel talks to, so all of them fail the same clear way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from flywheel.errors import FlywheelError, ServiceUnavailableError


def require_healthy(service: str, base_url: str, *, path: str = "/health", timeout: float = 5.0) -> None:
    """Raise ServiceUnavailableError naming `base_url` unless GET `base_url + path` answers HTTP 200."""
    try:
        response = httpx.get(f"{base_url}{path}", timeout=timeout)
    except httpx.ConnectError as exc:  # refused, or no such host: nothing to wait for
        raise ServiceUnavailableError(service, base_url, f"{type(exc).__name__}: {exc}", retryable=False) from exc
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(service, base_url, f"{type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise ServiceUnavailableError(service, base_url, f"GET {path} answered HTTP {response.status_code}")


@contextmanager
def unavailable_as(service: str, base_url: str, *, path: str = "/health") -> Iterator[None]:
    """Turn any failure inside the block into ServiceUnavailableError naming `service` and `base_url` when
    that server no longer answers its health check (it died or restarted mid-step); other failures, and
    our own errors, pass unchanged. SDK errors (httpx, requests, MlflowException) then read the same."""
    try:
        yield
    except FlywheelError:
        raise
    except Exception as exc:
        try:
            require_healthy(service, base_url, path=path, timeout=3.0)
        except ServiceUnavailableError as down:
            raise ServiceUnavailableError(
                service, base_url, f"{type(exc).__name__} during the call; then {down.detail}"
            ) from exc
        raise
