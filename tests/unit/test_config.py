import pytest

from flywheel.config import load_settings
from flywheel.errors import ConfigError


def test_defaults_are_local_and_derived_paths_follow_the_workspace(tmp_path):
    settings = load_settings(workspace=tmp_path / "ws")
    assert settings.catalog_url == f"sqlite:///{tmp_path / 'ws' / 'catalog.db'}"
    assert settings.label_studio.url == "http://127.0.0.1:8080"
    assert settings.mlflow.url == "http://127.0.0.1:5000"
    assert settings.prefect.api_url == "http://127.0.0.1:4200/api"
    assert settings.registered_model_name == "flywheel-default"


def test_environment_overrides_nested_settings(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_MLFLOW__PORT", "5123")
    monkeypatch.setenv("FLYWHEEL_K_PER_ROUND", "7")
    settings = load_settings()
    assert settings.mlflow.url == "http://127.0.0.1:5123"
    assert settings.k_per_round == 7


def test_toml_file_is_read(tmp_path, monkeypatch):
    config = tmp_path / "flywheel.toml"
    config.write_text('project = "shoes"\n[finetune]\nmin_labels = 42\n')
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config))
    settings = load_settings()
    assert (settings.project, settings.finetune.min_labels) == ("shoes", 42)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"bogus": 1}, "bogus"),
        ({"k_per_round": 0}, "k_per_round"),
        ({"mlflow": {"port": 70000}}, "mlflow.port"),
        ({"finetune": {"depth": "deepest"}}, "finetune.depth"),
        ({"classes": ["a", "a"]}, "classes"),
        ({"backbone": "alexnet"}, "backbone: .*unknown backbone 'alexnet'.*efficientnet_lite0"),
        ({"strategy": "magic"}, "strategy: .*unknown strategy 'magic'.*auto, badge"),
    ],
)
def test_bad_settings_name_the_setting(overrides, names):
    with pytest.raises(ConfigError, match=names):
        load_settings(**overrides)


def test_secrets_do_not_print():
    settings = load_settings()
    assert "flywheel-local-token" not in repr(settings)
    assert "flywheel-local-token" not in str(settings.model_dump())
