"""What an annotator sees: the Label Studio data manager of a project, sorted by the selection score,
saved as a PNG by headless Debian Chromium driven over the DevTools protocol (no Playwright needed).

    .venv/bin/python -m bench.screenshot PROJECT_ID docs/labelstudio-data-manager.png
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect as ws_connect

from flywheel.config import Settings, load_settings
from flywheel.labelstudio import connect

VIEW = "by selection score"  # a data manager tab, sorted by the prediction's score (the selection score)
HIDDEN = [  # data manager columns that say nothing to an annotator choosing what to label next
    "tasks:annotations_results", "tasks:annotations_ids", "tasks:predictions_results", "tasks:file_upload",
    "tasks:inner_id",
    "tasks:storage_filename", "tasks:created_at", "tasks:updated_at", "tasks:updated_by", "tasks:avg_lead_time",
    "tasks:draft_exists", "tasks:annotators", "tasks:total_predictions", "tasks:cancelled_annotations",
]  # fmt: skip


def _session_cookies(settings: Settings) -> dict[str, str]:
    """Log in through the web form, as a person would; returns the session cookies."""
    with httpx.Client(base_url=settings.label_studio.url, trust_env=False, follow_redirects=True) as web:
        web.get("/user/login/")
        form = {
            "email": settings.label_studio.username,
            "password": settings.label_studio.password.get_secret_value(),
            "csrfmiddlewaretoken": web.cookies["csrftoken"],
        }
        web.post("/user/login/", data=form, headers={"Referer": f"{settings.label_studio.url}/user/login/"})
        if "sessionid" not in web.cookies:
            raise RuntimeError("Label Studio did not accept the login (label_studio.username / password)")
        return {name: web.cookies[name] for name in ("sessionid", "csrftoken")}


def data_manager_screenshot(settings: Settings, project_id: int, out: Path, *, width: int = 1600) -> None:
    client = connect(settings)
    for view in client.views.list(project=project_id):
        if (view.data or {}).get("title") == VIEW:
            client.views.delete(id=view.id)
    client.views.create(
        project=project_id,
        data={
            "title": VIEW,
            "ordering": ["-tasks:predictions_score"],
            "hiddenColumns": {"explore": HIDDEN, "labeling": HIDDEN},
        },
    )
    page_screenshot(settings, f"/projects/{project_id}/data", out, width=width)


def page_screenshot(settings: Settings, path: str, out: Path, *, width: int = 1600, wait_s: float = 12) -> None:
    """A PNG of one Label Studio page as the logged-in user sees it, `wait_s` after it starts loading."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("Chromium not found: sudo apt-get install -y chromium")
    cookies = _session_cookies(settings)
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},1000", "about:blank"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            call = _devtools(Path(profile))
            call("Network.enable")
            for name, value in cookies.items():
                call("Network.setCookie", name=name, value=value, url=settings.label_studio.url)
            call("Emulation.setDeviceMetricsOverride", width=width, height=1000, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=f"{settings.label_studio.url}{path}")
            time.sleep(wait_s)  # pages load their data and images in the background
            shot = call("Page.captureScreenshot", format="png")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait(10)


def _devtools(profile: Path) -> Callable[..., dict[str, Any]]:
    """A call(method, **params) over the DevTools websocket of the Chromium using `profile`."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("Chromium did not open its DevTools port")
        time.sleep(0.2)
    port = int(port_file.read_text().split()[0])
    page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json", trust_env=False).json() if t["type"] == "page")
    ws = ws_connect(page["webSocketDebuggerUrl"], max_size=None)
    calls = iter(range(1, 10**6))

    def call(method: str, **params: Any) -> dict[str, Any]:
        ident = next(calls)
        ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(ws.recv())
            if message.get("id") == ident:
                return dict(message.get("result", {}))

    return call


if __name__ == "__main__":
    # PROJECT_ID OUT.png [data | model | task:ID]: the data manager, the Model (ML backend) settings, one task
    settings, project, target = load_settings(), int(sys.argv[1]), Path(sys.argv[2])
    page = sys.argv[3] if len(sys.argv) > 3 else "data"
    if page == "data":
        data_manager_screenshot(settings, project, target)
    elif page == "model":
        page_screenshot(settings, f"/projects/{project}/settings/ml", target, wait_s=8)
    else:
        page_screenshot(settings, f"/projects/{project}/data?task={page.removeprefix('task:')}", target, wait_s=15)
