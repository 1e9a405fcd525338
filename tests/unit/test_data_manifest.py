"""Bad manifests and bad settings: every error names the file, line, column and field (or the setting, its
environment variable and the allowed values); entries outside the allowed roots are refused."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.errors import ConfigError, DataError
from flywheel.sources.importing import import_source, read_image_folder
from flywheel.sources.manifest import read_manifest


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A manifest folder holding a.png, next to an `outside` folder holding secret.png."""
    _png(tmp_path / "data" / "a.png", 10)
    _png(tmp_path / "outside" / "secret.png", 20)
    return tmp_path / "data"


def _read(base: Path, name: str, content: str | bytes, **kwargs):
    manifest = base / name
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    return read_manifest(manifest, base / "cache", **kwargs)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.jsonl", '{"path": "a.png"}\n{"path": "a.png",,}\n', r"m\.jsonl:2:18: invalid JSON"),
        ("m.jsonl", '["a.png"]\n', r"m\.jsonl:1:1: expected a JSON object, got list"),
        ("m.jsonl", '{"path": ["a.png"]}\n', r"m\.jsonl:1:2: field 'path': expected a string, got list"),
        ("m.jsonl", '{"path": "a.png",  "label": {"x": 1}}\n', r"m\.jsonl:1:20: field 'label': expected a string"),
        ("m.jsonl", '{"label": "cat"}\n', r"m\.jsonl:1: needs a 'path' or 'uri' field, got fields \['label'\]"),
        ("m.jsonl", '{"uri": "s3://bucket/a.png"}\n', r"m\.jsonl:1:2: field 'uri': unsupported URI scheme 's3'"),
        ("m.jsonl", '{"uri": "file://evil.example/etc/x.png"}\n', r"1:2: field 'uri': file URI .* names host"),
        (
            "m.csv",
            "path,label\na.png,cat\nnowhere.png,dog\n",
            r"m\.csv:3:1: field 'path': image .*nowhere\.png does not",
        ),
        ("m.csv", "label,path\ncat,a.png,extra\n", r"m\.csv:2:3: 3 fields, the header has 2 \(label, path\)"),
        ("m.csv", 'path,label\n"a.png,cat\n', r"m\.csv:\d+: invalid CSV"),
        ("m.csv", "path,path\na.png,a.png\n", r"m\.csv:1:1: column 'path' appears twice"),
        ("m.csv", "name,label\nx.png,cat\n", r"m\.csv:1:1: the CSV header needs a 'path' or 'uri' column"),
        ("m.csv", 'label,path\n"two\nlines",nowhere.png\n', r"m\.csv:2:2: field 'path': image"),  # where the row starts
        ("m.csv", b"path,label\na.png,caf\xe9\n", r"m\.csv:2:10: not UTF-8"),
        ("m.txt", "a.png\n", r"unsupported suffix '\.txt'"),
    ],
)
def test_bad_manifest_errors_name_file_line_column_and_field(base, name, content, message):
    with pytest.raises(DataError, match=message):
        _read(base, name, content)


def test_good_rows_of_both_formats_and_integer_labels(base):
    records, classes = _read(
        base, "m.jsonl", '{"path": "a.png", "label": 3}\n\n{"uri": "file://%s"}\n' % (base / "a.png")
    )
    assert [(Path(r.path).name, r.label) for r in records] == [("a.png", "3"), ("a.png", None)]
    assert classes == ["3"]
    records, _ = _read(base, "m.csv", "\ufeffpath , label\n a.png , cat \n,\n")  # BOM, spaces, an empty row
    assert [(Path(r.path).name, r.label) for r in records] == [("a.png", "cat")]


@pytest.mark.parametrize(
    "entry",
    [
        "../outside/secret.png",  # traversal
        "sub/../../outside/secret.png",
        "{outside}/secret.png",  # an absolute path elsewhere
        "file://{outside}/secret.png",
        "link.png",  # a symlink inside the folder pointing out of it
        "linkdir/secret.png",  # a symlinked folder pointing out of it
    ],
)
def test_entries_resolving_outside_the_allowed_roots_are_refused(base, entry):
    outside = base.parent / "outside"
    (base / "link.png").symlink_to(outside / "secret.png")
    (base / "linkdir").symlink_to(outside)
    line = json.dumps({"path": entry.format(outside=outside)})
    with pytest.raises(DataError, match=r"m\.jsonl:1:2: field 'path': .* resolves to .*outside/secret\.png, outside "
                                        r"the allowed roots .*FLYWHEEL_ALLOWED_ROOTS"):  # fmt: skip
        _read(base, "m.jsonl", line + "\n")
    records, _ = _read(base, "m.jsonl", line + "\n", allowed_roots=[str(outside)])  # allowed when listed
    assert records[0].path == str((outside / "secret.png").resolve())


def test_import_allows_the_workspace_and_settings_roots(tmp_path, base):
    outside = base.parent / "outside"
    manifest = base / "m.csv"
    manifest.write_text(f"path\n{outside / 'secret.png'}\n")
    settings = load_settings(workspace=tmp_path / "ws")
    with pytest.raises(DataError, match="outside the allowed roots"):
        import_source(Catalog(settings.catalog_url), settings, str(manifest))
    widened = load_settings(workspace=tmp_path / "ws", allowed_roots=[str(outside)])
    assert import_source(Catalog(widened.catalog_url), widened, str(manifest))["pool"].added == 1


def test_image_folder_refuses_a_symlink_escaping_the_tree(tmp_path, base):
    tree = tmp_path / "tree"
    _png(tree / "cat" / "ok.png")
    (tree / "cat" / "escape.png").symlink_to(tmp_path / "outside" / "secret.png")
    with pytest.raises(DataError, match=r"escape\.png resolves to .*secret\.png, outside the allowed roots"):
        read_image_folder(tree)
    records, _ = read_image_folder(tree, allowed_roots=[tmp_path / "outside"])
    assert len(records) == 2


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # http.server calls it by this name
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
            return
        body = (Path(self.server.root) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def web(base):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.root = str(base)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_uris_only_below_an_allowed_prefix_and_never_redirected(base, web):
    with pytest.raises(DataError, match=r"1:2: field 'uri': URL .* is not below an allowed URL prefix \(none\)"):
        _read(base, "m.jsonl", json.dumps({"uri": f"{web}/a.png"}) + "\n")
    allowed = {"allowed_roots": [f"{web}/"]}
    records, _ = _read(base, "m.jsonl", json.dumps({"uri": f"{web}/a.png"}) + "\n", **allowed)
    assert Path(records[0].path).read_bytes() == (base / "a.png").read_bytes()
    assert Path(records[0].path).is_relative_to(base / "cache")
    with pytest.raises(DataError, match=r"redirects to http://169\.254\.169\.254/.*not followed"):
        _read(base, "m.jsonl", json.dumps({"uri": f"{web}/redirect.png"}) + "\n", **allowed)
    narrow = {"allowed_roots": [f"{web}/images"]}
    for url in (f"{web}/images/../a.png", f"{web}/images-other/a.png", web.replace("//", "//user:pw@") + "/images/a"):
        with pytest.raises(DataError, match="not below an allowed URL prefix|carries credentials"):
            _read(base, "m.jsonl", json.dumps({"uri": url}) + "\n", **narrow)


# --- settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"finetune": {"depth": "deepest"}},
            r"finetune\.depth: Input should be 'auto', 'head', 'last' or 'all', got "
            r"'deepest' \(env FLYWHEEL_FINETUNE__DEPTH\)",
        ),  # fmt: skip
        (
            {"mlflow": {"prot": 1}},
            r"mlflow\.prot: Extra inputs are not permitted; known names here: (\w+, )*experiment, host, "
            r"port, (\w+, )*registered_model \(env FLYWHEEL_MLFLOW__PROT\)",
        ),  # fmt: skip
        ({"near_duplicate_cosine": 1.5}, r"near_duplicate_cosine: .*less than or equal to 1, got 1\.5"),
        ({"max_image_pixels": 10**12}, r"max_image_pixels: .*less than or equal to 178956970"),
        ({"strategy": "magic"}, r"strategy: .*unknown strategy 'magic'; choose one of: .*entropy"),
    ],
)
def test_bad_settings_name_the_setting_its_variable_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(**overrides)


def test_bad_environment_value_names_the_variable_and_a_secret_is_never_echoed(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_K_PER_ROUND", "lots")
    with pytest.raises(ConfigError, match=r"k_per_round: .*got 'lots' \(env FLYWHEEL_K_PER_ROUND\)"):
        load_settings()
    monkeypatch.delenv("FLYWHEEL_K_PER_ROUND")
    with pytest.raises(ConfigError) as caught:
        load_settings(label_studio={"token": ["hunter2-token"]})
    assert "label_studio.token" in str(caught.value) and "hunter2" not in str(caught.value)


def test_toml_with_a_secret_or_bad_syntax_is_refused_naming_the_file(tmp_path, monkeypatch):
    config = tmp_path / "flywheel.toml"
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config))
    config.write_text('[label_studio]\nport = 8081\ntoken = "hunter2-token"\n')
    with pytest.raises(
        ConfigError, match=r"flywheel\.toml: label_studio\.token is a secret .*FLYWHEEL_LABEL_STUDIO__TOKEN"
    ):
        load_settings()
    config.write_text("[label_studio\nport = 8081\n")
    with pytest.raises(ConfigError, match=r"flywheel\.toml: invalid TOML: .*line 1"):
        load_settings()
    config.write_text("[label_studio]\nport = 8081\n")
    assert load_settings().label_studio.port == 8081
