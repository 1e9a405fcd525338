"""The refusals every HTTP entry point shares: a body over its limit, and a champion that cannot be had."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flywheel.errors import ServiceUnavailableError
from flywheel.serving.champion import Champion, ChampionSource


def too_large(request: Request, limit: int) -> JSONResponse | None:
    """A 413 when the declared body is over `limit` bytes, else None."""
    if int(request.headers.get("content-length") or 0) > limit:
        return JSONResponse({"error": f"body over {limit} bytes"}, status_code=413)
    return None


async def current_champion(champions: ChampionSource) -> Champion | None | JSONResponse:
    """The champion (None before there is one), or a 503 naming the registry that did not answer."""
    try:
        return await run_in_threadpool(champions.current)
    except ServiceUnavailableError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
