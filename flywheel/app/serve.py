"""`flywheel serve`: the champion over HTTP for anyone with images, not only Label Studio.

    POST /predict  an image as the body (Content-Type image/*), or JSON {"images": [...]} where each item is
                   an http(s) URL, a data: URI or plain base64
    ->  {"model_version": "7", "classes": [...], "predictions": [{"label": ..., "probabilities": {...}}]}
    GET  /health

The champion is read from the registry and read again when its alias moves (`serve.recheck_s`), so a
promotion reaches callers without a restart. With `serve.token` set, callers send `Authorization: Bearer`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flywheel.app.refusals import current_champion, too_large
from flywheel.config import Settings
from flywheel.errors import BadImageError, DataError, FlywheelError
from flywheel.serving.champion import Champion, ChampionSource, local_copy, predict

MAX_BODY = 64 * 1024 * 1024  # bytes of one request


def create_app(settings: Settings, champions: ChampionSource) -> FastAPI:
    token = settings.serve.token.get_secret_value()
    app = FastAPI(title="flywheel serve", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.post("/predict")
    async def predict_images(request: Request) -> JSONResponse:
        given = request.headers.get("authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"error": "missing or wrong Authorization: Bearer token"}, status_code=401)
        if (refusal := too_large(request, MAX_BODY)) is not None:
            return refusal
        champion = await current_champion(champions)
        if isinstance(champion, JSONResponse):
            return champion
        if champion is None:
            return JSONResponse({"error": "no champion yet: run `flywheel round` first"}, status_code=503)
        body, kind = await request.body(), request.headers.get("content-type", "")
        try:
            answer = await run_in_threadpool(_answer, champion, body, kind, settings.serve.max_images)
        except DataError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except FlywheelError as exc:  # an image that cannot be decoded: the error names it
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse(answer)

    return app


def _answer(champion: Champion, body: bytes, content_type: str, max_images: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flywheel-serve-") as tmp:
        folder = Path(tmp)
        paths = _images(body, content_type, folder, max_images)
        try:
            probs = predict(champion, [None] * len(paths), paths)
        except BadImageError as exc:  # name the request's image, not the temporary file
            which = f"images[{paths.index(exc.path)}]" if exc.path in paths else "the image"
            raise DataError(f"{which}: {exc.reason}{': ' + exc.detail if exc.detail else ''}") from exc
    return {
        "model_version": champion.version,
        "classes": champion.classes,
        "predictions": [
            {"label": champion.classes[int(np.argmax(row))],
             "probabilities": dict(zip(champion.classes, map(float, row), strict=True))}
            for row in probs
        ],
    }  # fmt: skip


def _images(body: bytes, content_type: str, folder: Path, max_images: int) -> list[str]:
    """Local files for the request's images: the body itself, or each item of {"images": [...]}."""
    if not content_type.startswith("application/json"):
        if not body:
            raise DataError('send an image as the body, or JSON {"images": [...]}')
        (folder / "0").write_bytes(body)
        return [str(folder / "0")]
    try:
        items = json.loads(body).get("images")
    except (ValueError, AttributeError, RecursionError) as exc:
        raise DataError("the body is not a JSON object with an `images` list") from exc
    if not isinstance(items, list) or not 0 < len(items) <= max_images:
        raise DataError(f"`images` must be a list of 1 to {max_images} URLs or base64 strings")
    paths = []
    for k, item in enumerate(items):
        if not isinstance(item, str):
            raise DataError(f"images[{k}]: a URL or a base64 string, got {type(item).__name__}")
        paths.append(
            local_copy(item, folder) if item.startswith(("http://", "https://")) else _decoded(item, k, folder)
        )
    return paths


def _decoded(item: str, k: int, folder: Path) -> str:
    encoded = item.partition(",")[2] if item.startswith("data:") else item
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"images[{k}]: neither an http(s) URL nor valid base64 ({exc})") from exc
    target = folder / f"b{k}"
    target.write_bytes(data)
    return str(target)


def serve(settings: Settings) -> None:
    import uvicorn

    app = create_app(settings, ChampionSource(settings, recheck_s=settings.serve.recheck_s))
    uvicorn.run(app, host=settings.serve.host, port=settings.serve.port, log_level="warning")
