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


@pytest.mark.parametrize("written", ["circle, square", '["circle", "square"]'])
def test_list_settings_from_the_environment_take_commas_or_json(monkeypatch, written):
    monkeypatch.setenv("FLYWHEEL_CLASSES", written)
    monkeypatch.setenv("FLYWHEEL_ALLOWED_ROOTS", "http://127.0.0.1:9000/,/data/images")
    monkeypatch.setenv("FLYWHEEL_FINETUNE__BACKBONES", "efficientnet_lite0,efficientnet_lite1")
    settings = load_settings()
    assert settings.classes == ["circle", "square"]
    assert settings.allowed_roots == ["http://127.0.0.1:9000/", "/data/images"]
    assert settings.finetune.backbones == ["efficientnet_lite0", "efficientnet_lite1"]


def test_a_dict_setting_that_is_not_json_says_so_in_one_line(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_SECRET_BLOCKS", "label_studio.token=ls-token")
    with pytest.raises(ConfigError, match=r"^invalid settings: FLYWHEEL_SECRET_BLOCKS must be JSON \(.*\), e\.g\. "):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [("FLYWHEEL_K_PER_ROUNDS", "FLYWHEEL_K_PER_ROUND"), ("FLYWHEEL_MLFLOW__PROT", "FLYWHEEL_MLFLOW__PORT")],
)
def test_a_misspelled_variable_is_refused_with_the_likely_name(monkeypatch, variable, suggestion):
    monkeypatch.setenv(variable, "5")
    with pytest.raises(ConfigError, match=rf"{variable} is set in the environment but names no setting; "
                       rf"did you mean {suggestion}\?"):  # fmt: skip
        load_settings()


def test_variables_that_are_not_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TEST_SOMETHING", "1")
    monkeypatch.setenv("FLYWHEEL_FAULT_AT", "")
    assert load_settings().k_per_round == 100


def test_a_settings_file_that_does_not_exist_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"FLYWHEEL_CONFIG=.*missing\.toml: no such file"):
        load_settings()


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ('catalog_url = "postgresql+psycopg://flywheel:hunter2@db:5432/flywheel"', "catalog_url"),
        ('[mlflow]\nbackend_store_uri = "postgresql://u:hunter2@db/mlflow"', "mlflow.backend_store_uri"),
    ],
)
def test_a_password_inside_a_url_in_the_file_is_refused(tmp_path, monkeypatch, line, name):
    config = tmp_path / "flywheel.toml"
    config.write_text(line + "\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config))
    with pytest.raises(ConfigError, match=rf"{name} holds a password in its URL and must not be in a file") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)
    config.write_text(line.replace(":hunter2", "") + "\n")  # the same URL without the password is fine
    load_settings()
