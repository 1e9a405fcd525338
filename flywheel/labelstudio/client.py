"""The Label Studio connection and task listing: the one place task ids meet flywheel sample ids.

Every task flywheel creates carries `data.sample_id`; every conversion between the two reads it back from
Label Studio rather than trusting positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from flywheel.config import Settings
from flywheel.errors import ConfigError, ServiceUnavailableError
from flywheel.health import require_healthy

SERVICE = "Label Studio"
HEALTH_TIMEOUT_S = 3.0
API_TIMEOUT_S = 300.0  # an export or import of ~10k tasks takes ~10 s; leave room on a loaded machine
PAGE_SIZE = 1000  # tasks per list page


def connect(settings: Settings) -> LabelStudio:
    """An SDK client for the configured server, after checking that it answers and accepts the token.

    Raises ServiceUnavailableError when /health does not answer, ConfigError when the token is refused.
    """
    url = settings.label_studio.url
    require_healthy(SERVICE, url, timeout=HEALTH_TIMEOUT_S)
    client = LabelStudio(  # type: ignore[no-untyped-call]  # the SDK's __init__ is unannotated (*args, **kwargs)
        base_url=url, api_key=settings.label_studio.token.get_secret_value(), timeout=API_TIMEOUT_S
    )
    try:
        client.users.whoami()
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise ConfigError(
                f"{SERVICE} at {url} refused the API token (HTTP {exc.status_code}); set "
                "FLYWHEEL_LABEL_STUDIO__TOKEN (label_studio.token) to the legacy API token "
                "of a user of that server"
            ) from exc
        raise ServiceUnavailableError(SERVICE, url, f"GET /api/current-user/whoami -> HTTP {exc.status_code}") from exc
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(SERVICE, url, f"{type(exc).__name__}: {exc}") from exc
    return client


def unavailable(client: LabelStudio, exc: Exception) -> ServiceUnavailableError:
    """A connection failure in the middle of a call, as the error every caller already handles."""
    url = client._client_wrapper.get_base_url()
    return ServiceUnavailableError(SERVICE, url, f"{type(exc).__name__}: {exc}")


def filter_query(items: list[dict[str, Any]], conjunction: str = "and") -> str:
    return json.dumps({"filters": {"conjunction": conjunction, "items": items}})


def number_filter(name: str, operator: str, value: int) -> dict[str, Any]:
    return {"filter": f"filter:tasks:{name}", "operator": operator, "type": "Number", "value": value}


def list_tasks(
    client: LabelStudio, project_id: int, *, query: str | None = None, fields: str = "task_only"
) -> list[Any]:
    """All tasks of the project matching a Data Manager query (JSON), in pages of PAGE_SIZE."""
    kwargs: dict[str, Any] = {"project": project_id, "fields": fields, "page_size": PAGE_SIZE}
    if query is not None:
        kwargs["query"] = query
    return list(client.tasks.list(**kwargs))


def task_sample_id(data: dict[str, Any] | None) -> int | None:
    value = (data or {}).get("sample_id")
    if isinstance(value, bool):
        return None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def task_sample_ids(
    client: LabelStudio,
    project_id: int,
    *,
    task_ids: Sequence[int] | None = None,
    after_task_id: int | None = None,
) -> dict[int, int]:
    """Label Studio task id -> data.sample_id for the project's tasks: all, just `task_ids`, or those
    with an id above `after_task_id`."""
    query = None
    if task_ids is not None:
        query = json.dumps({"selectedItems": {"all": False, "included": list(task_ids)}})
    elif after_task_id is not None:
        query = filter_query([number_filter("id", "greater", after_task_id)])
    out: dict[int, int] = {}
    for task in list_tasks(client, project_id, query=query):
        sample_id = task_sample_id(task.data)
        if sample_id is not None:
            out[int(task.id)] = sample_id
    return out
