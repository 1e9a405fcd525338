"""The one settings object. Loaded once at an entry point (CLI, flow, test) and passed down.

Values come from, in order of precedence: keyword arguments, environment (`FLYWHEEL_*`, nested with
`__`, e.g. `FLYWHEEL_MLFLOW__PORT=5001`), a TOML file (`flywheel.toml` in the working directory or
the path in `FLYWHEEL_CONFIG`), then the defaults below, which run everything on one machine.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

LOOPBACK = "127.0.0.1"
ENV_PREFIX = "FLYWHEEL_"
# FLYWHEEL_* variables that are not settings: the settings file, the test harness's, the fault injector's.
NOT_SETTINGS = ("FLYWHEEL_CONFIG", "FLYWHEEL_FAULT_AT")
NOT_SETTINGS_PREFIX = "FLYWHEEL_TEST_"


def _split_list(value: object) -> object:
    """A list setting from the environment: comma-separated (`a,b`) or JSON (`["a", "b"]`)."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        return json.loads(value)
    return [part.strip() for part in value.split(",") if part.strip()]


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]
"""A list of names or paths: `FLYWHEEL_CLASSES=circle,square` or `FLYWHEEL_CLASSES='["circle", "square"]'`."""


def _known(what: str, value: str, choices: Collection[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(sorted(choices))}")
    return value


class WorkspaceDirs(NamedTuple):
    """The folders of a workspace, derived from its root so that they cannot drift apart."""

    embeddings: Path
    sources: Path
    checkpoints: Path
    logs: Path
    results: Path  # persisted Prefect task results (the embedding tasks' cache)

    @classmethod
    def under(cls, root: Path) -> WorkspaceDirs:
        return cls(*(root / name for name in ("embeddings", "sources", "checkpoints", "logs", "prefect-results")))


Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Server(_Section):
    """A server on host:port, loopback unless told otherwise; each kind sets its own default port."""

    host: str = LOOPBACK
    port: Port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class LabelStudioSettings(_Server):
    port: Port = 8080
    username: str = "flywheel@localhost"
    password: SecretStr = SecretStr("flywheel-local-only")
    token: SecretStr = SecretStr("flywheel-local-token")
    project_title: str = ""  # empty: "flywheel-<project>"
    # Local Storage serves files below this root only; the default covers any absolute path.
    document_root: Path = Path("/")
    # Server executable; empty: <repo>/.ls-venv/bin/label-studio when present, else `label-studio` on PATH.
    executable: str = ""
    label_mode: Literal["single", "multi"] = Field("single", description="one class per image, or any number")
    instructions: str = Field("", description="shown to annotators above the image and as the project's instructions")
    overlap: int = Field(1, ge=1, le=20, description="annotators per task; above 1, labels are a majority vote")
    max_open_tasks: int = Field(
        0, ge=0, description="rounds stop pushing while this many tasks wait for an annotation; 0: 3 x k_per_round"
    )
    export_above: int = Field(
        2000, ge=0, description="sync reads one export snapshot when the project has more tasks than this, else pages"
    )


class MLflowSettings(_Server):
    port: Port = 5000
    experiment: str = ""  # empty: "flywheel-<project>"
    registered_model: str = ""  # empty: "flywheel-<project>"
    backend_store_uri: str = Field(
        "",
        description="the server's runs and registry, e.g. postgresql+psycopg://user@host/mlflow; empty: SQLite "
        "in the workspace",
    )


class WebhookSettings(_Section):
    """The receiver Label Studio posts annotation events to (`flywheel webhook`)."""

    host: str = LOOPBACK
    port: Port = 8765
    # Shared with Label Studio in the X-Flywheel-Secret header; empty: no receiver, no registration (polling only).
    secret: SecretStr = SecretStr("")
    url: str = Field("", description="where Label Studio reaches the receiver; empty: http://<host>:<port>/webhook")
    emit_events: bool = Field(True, description="emit flywheel.annotation.* Prefect events for applied changes")
    ml_backend: bool = Field(
        True, description="also serve Label Studio's ML backend protocol and connect it on the project's Model page"
    )
    ml_backend_user: str = Field("flywheel", description="basic-auth user Label Studio sends; the password: secret")
    sync_every_s: float = Field(
        30.0, ge=0, description="flywheel.labels.changed (which starts a sync) at most once per this many seconds"
    )

    @property
    def endpoint(self) -> str:
        return self.url or f"http://{self.host}:{self.port}/webhook"


class ServeSettings(_Server):
    """`flywheel serve`: the champion over HTTP, images in, class probabilities out."""

    port: Port = 8790
    token: SecretStr = Field(SecretStr(""), description="bearer token callers must send; empty: none (loopback)")
    recheck_s: float = Field(5.0, ge=0, description="how often the champion alias is read again (a promotion)")
    max_images: int = Field(256, ge=1, description="images in one request")


class StorageSettings(_Section):
    """S3-compatible object storage: s3:// image URIs reach annotators as presigned URLs."""

    endpoint: str = Field("", description="e.g. http://127.0.0.1:9000 (MinIO); empty: AWS S3 in `region`")
    region: str = "us-east-1"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    addressing: Literal["path", "virtual"] = Field("path", description="bucket in the path or in the host name")
    presign_expiry_s: int = Field(7 * 24 * 3600, ge=1, le=7 * 24 * 3600, description="SigV4 allows 7 days at most")


class PrefectSettings(_Server):
    """The Prefect server, and how the deployments (flows/deploy.py) run the flywheel by themselves."""

    port: Port = 4200
    work_pool: str = Field("flywheel", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="process work pool")
    round_cron: str = Field("0 * * * *", pattern=r"^\S+( \S+){4}$", description="when the `round` deployment runs")
    timezone: str = Field("UTC", description="of round_cron")
    sync_interval_s: int = Field(300, ge=10, description="the `sync` deployment also runs on annotation events")
    task_retries: int = Field(3, ge=0, description="retries of every network task (Label Studio, MLflow)")
    retry_delay_s: float = Field(2.0, ge=0, description="first retry delay; doubles each retry")
    worker_poll_s: float = Field(5.0, gt=0, description="how often the worker asks for runs")
    slot_lease_s: float = Field(
        60.0, ge=60, description="the project slot's lease (the server's minimum is 60), renewed while its holder "
        "lives: a holder on another host that died frees the slot this long (plus a 15 s sweep) after"
    )  # fmt: skip
    slot_report_s: float = Field(10.0, gt=0, description="a run waiting for the project slot says so this often")
    database_url: str = Field(
        "",
        description="the server's database, e.g. postgresql+asyncpg://user@host/prefect; empty: Prefect's SQLite "
        "in the workspace",
    )

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


class PostgresSettings(_Section):
    """A local PostgreSQL cluster (flywheel/devservers/postgres.py) for development and tests: Debian's server on
    loopback, data under <workspace>/services/postgres, passwordless on 127.0.0.1. Used only where a URL names its
    host and port."""

    host: str = LOOPBACK
    port: Port = Field(5433, description="5433: beside a system PostgreSQL on 5432")
    user: str = Field("flywheel", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    bin_dir: str = Field("", description="folder with initdb and pg_ctl; empty: newest /usr/lib/postgresql/*/bin")

    def url(self, database: str, driver: str = "psycopg") -> str:
        """SQLAlchemy URL of `database` here (driver psycopg for flywheel and MLflow, asyncpg for Prefect)."""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{database}"


class FinetuneSettings(_Section):
    """When a deeper fine-tune runs, and how (the seeds' decision table lives in policy.py)."""

    min_labels: int = Field(300, ge=1, description="labelled samples before the first fine-tune")
    every_new_labels: int = Field(200, ge=1, description="new labels between two fine-tunes")
    pending_timeout_s: float = Field(
        6 * 3600, gt=0, description="a requested or running fine-tune counts this long (then it is taken as dead)"
    )
    epochs: int = Field(8, ge=1)
    head_epochs: int = Field(1, ge=0, description="LP-FT: epochs with the body frozen first")
    batch_size: int = Field(64, ge=1)
    head_lr: float = Field(
        1e-2,
        gt=0,
        description="AdamW; earlier groups get 1/10 and 1/100 of it (at 1e-3 the body barely moved: bench/finetune.py)",
    )
    weight_decay: float = Field(1e-4, ge=0)
    depth: Literal["auto", "head", "last", "all"] = "auto"
    domain: Literal["auto", "near", "far"] = Field(
        "auto", description="auto: measured by a stage probe (transfer.probe_domain); near/far force it"
    )
    gradual_unfreeze: bool = Field(True, description="unfreeze the policy's groups one at a time from the top")
    patience: int = Field(2, ge=0, description="body epochs without a better validation score before stopping; 0: off")
    min_body_steps: int = Field(
        150, ge=0, le=100_000, description="optimizer steps the body phase takes at least (epochs grow to reach them)"
    )
    max_epochs: int = Field(40, ge=1, description="the most epochs min_body_steps may lengthen a fine-tune to")
    min_validation_to_select: int = Field(
        200, ge=0, description="validation images needed to pick the best epoch and stop early; fewer: the last"
    )
    hflip: bool = Field(True, description="random horizontal flips (turn off for text, digits, oriented data)")
    adapt_batchnorm: bool = Field(
        False, description="re-estimate BatchNorm statistics at depth 'all' (off: statistics stay ImageNet's)"
    )
    resume: bool = Field(True, description="continue an interrupted fine-tune from its last epoch checkpoint")
    backbones: StrList = Field(
        default_factory=list,
        description="candidates scored by transferability before the first fine-tune; empty: every backbone "
        "whose weights are available offline",
    )
    transferability: Literal["logme", "knn"] = "logme"
    pick_backbone: bool = Field(
        True,
        description="before the first fine-tune, start from the candidate that transfers best when it beats the "
        "current backbone by backbone_margin; the project moves to it if the fine-tune is promoted",
    )
    backbone_margin: float = Field(
        0.01, ge=0, description="how much higher (LogME evidence per sample, or kNN accuracy) the best must score"
    )
    compile: bool = Field(False, description="torch.compile the classifier: a one-off compile, then faster steps")
    device: str = "auto"  # auto: cuda when present, else cpu


class ForecastSettings(_Section):
    """The label-budget forecast each round makes (flywheel.insight.forecast) and its stopping rule."""

    target_accuracy: float = Field(0.9, gt=0, le=1, description="the accuracy the forecast counts labels to")
    stop_window: int = Field(500, ge=1, description="labels ahead the stopping rule looks")
    stop_threshold: float = Field(
        0.003, ge=0, description="stop is recommended when stop_window more labels add less (0.003 = 0.3 points)"
    )
    bootstrap: int = Field(200, ge=10, le=10000, description="bootstrap refits behind the forecast's bands")


class ReviewSettings(_Section):
    """The label-quality review each round runs (flywheel.insight.review): flagged labels go to Label Studio."""

    enabled: bool = True
    min_labels: int = Field(50, ge=10, description="labels before the first review")
    folds: int = Field(5, ge=2, le=20, description="cross-validation folds for out-of-sample probabilities")
    max_per_round: int = Field(50, ge=1, description="review tasks one round sends at most")
    max_self_confidence: float = Field(
        0.07,
        gt=0,
        le=1,
        description="flag a label only when the out-of-sample model gives it at most this "
        "probability (bench/label_noise.py: 4% of right labels flagged at 0% noise, 69% precision at 10%)",
    )


class EmbedSettings(_Section):
    """How the embedding pipeline (flywheel/features/pipeline.py) feeds the body; batch size: embed_batch_size."""

    workers: int = Field(-1, ge=-1, description="DataLoader worker processes; -1: auto (by device and cores)")
    compile: bool = Field(False, description="torch.compile the body: a one-off compile, then faster batches")
    gpu_decode: bool = Field(True, description="decode JPEGs on the GPU (nvJPEG) when embedding on CUDA")
    shard_size: int = Field(8192, ge=1, description="images embedded between two saves: what a crash can lose")


class IndexSettings(_Section):
    """Which FAISS index the pool gets (flywheel/index/sharded.py): chosen by pool size and memory."""

    kind: Literal["auto", "flat", "ivf", "hnsw", "ivfpq"] = Field(
        "auto", description="auto: flat up to flat_max vectors, then ivf, ivfpq beyond memory_budget_gb"
    )
    flat_max: int = Field(200_000, ge=1, description="auto: exact search up to this many vectors")
    memory_budget_gb: float = Field(8.0, gt=0, description="auto: compress (IVF-PQ) when vectors exceed this")
    nlist: int = Field(0, ge=0, description="IVF lists; 0: 4 * sqrt(N) rounded to a power of two")
    nprobe: int = Field(32, ge=1, description="IVF lists searched per query (recall vs speed)")
    hnsw_m: int = Field(32, ge=4, description="HNSW links per vector")
    ef_search: int = Field(128, ge=1, description="HNSW candidates per query (recall vs speed)")
    train_size: int = Field(100_000, ge=1000, description="vectors sampled to train IVF/PQ (more when nlist needs)")
    rerank: int = Field(32, ge=0, description="ivfpq: re-rank this many x k candidates by exact cosine; 0/1: off")
    shard_size: int = Field(1_000_000, ge=1, description="vectors per saved shard (incremental adds fill the last)")


class ScaleoutSettings(_Section):
    """Where distributed flows run their tasks (flywheel/scaleout.py, flows/scale.py): a Dask or Ray cluster."""

    runner: Literal["dask", "ray"] = Field("dask", description="prefect-dask's or prefect-ray's task runner")
    address: str = Field(
        "", description="an existing cluster: Dask scheduler tcp://host:8786, Ray ray://host:10001; empty: local"
    )
    n_workers: int = Field(2, ge=1, description="local cluster: worker processes (one per GPU when present)")
    threads_per_worker: int = Field(1, ge=1, description="local Dask cluster: threads per worker process")
    shard_size: int = Field(4096, ge=1, description="samples per distributed embedding or scoring task")


class Settings(BaseSettings):
    """Every path, URL, port, credential and threshold flywheel uses."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    project: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    workspace: Path = Path(".flywheel")
    catalog_url: str = ""  # empty: SQLite file in the workspace
    classes: StrList = Field(default_factory=list, description="fixes the class list; else from the data")

    backbone: str = "efficientnet_lite0"
    image_size: int = Field(64, ge=16, le=1024)
    embed_batch_size: int = Field(128, ge=1)
    torch_threads: int = Field(0, ge=0, description="0: torch's default")

    strategy: str = "auto"
    k_per_round: int = Field(100, ge=1)
    seed: int = 0
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of labels kept for validation")
    head_l2: float = Field(0.1, gt=0, description="L2 penalty of the linear head (standardised features)")
    promotion_margin: float = Field(0.0, ge=0, description="accuracy points a challenger must add")

    # Bad input (docs/reliability.md): what is quarantined instead of stopping a round, and what is refused.
    max_image_pixels: int = Field(
        89_478_485,
        ge=1,
        le=178_956_970,
        description="images with more pixels are quarantined at import (decompression bombs); PIL's hard limit caps it",
    )
    near_duplicate_cosine: float = Field(
        0.99,
        gt=0,
        le=1,
        description="a selected sample at least this close (embedding cosine) to a labelled, already sent or "
        "better-ranked one is quarantined as a near-duplicate instead of being sent to Label Studio",
    )
    allowed_roots: StrList = Field(
        default_factory=list,
        description="folders (and http(s):// URL prefixes) manifest entries may point into, besides the "
        "manifest's own folder and the workspace; anything else, ../ and escaping symlinks included, is refused",
    )
    secret_blocks: dict[str, str] = Field(
        default_factory=dict,
        description="secret setting -> name of a Prefect Secret block holding its value, read when a flow starts "
        "(flows.common.settings_from), e.g. {'label_studio.token': 'ls-token'}; servers and other commands read env",
    )

    label_studio: LabelStudioSettings = LabelStudioSettings()
    mlflow: MLflowSettings = MLflowSettings()
    prefect: PrefectSettings = PrefectSettings()
    webhook: WebhookSettings = WebhookSettings()
    serve: ServeSettings = ServeSettings()
    storage: StorageSettings = StorageSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    embed: EmbedSettings = EmbedSettings()
    index: IndexSettings = IndexSettings()
    scaleout: ScaleoutSettings = ScaleoutSettings()
    forecast: ForecastSettings = ForecastSettings()
    review: ReviewSettings = ReviewSettings()
    postgres: PostgresSettings = PostgresSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("FLYWHEEL_CONFIG", "flywheel.toml"))
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file)

    @field_validator("workspace")
    @classmethod
    def _absolute_workspace(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from flywheel.features.backbones import BACKBONES  # imported here: settings stay cheap to import

        return _known("backbone", value, BACKBONES)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from flywheel.strategies import STRATEGIES

        return _known("strategy", value, STRATEGIES)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str]) -> list[str]:
        value = [name.strip() for name in value]
        if len({name.casefold() for name in value}) != len(value) or "" in value:
            raise ValueError(f"classes must be unique (ignoring case) and not empty, got {value}")
        return value

    @field_validator("secret_blocks")
    @classmethod
    def _secret_names(cls, value: dict[str, str]) -> dict[str, str]:
        allowed = secret_settings()
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"{unknown} are not secret settings; choose from: {', '.join(allowed)}")
        return value

    @model_validator(mode="after")
    def _default_catalog(self) -> Settings:
        if not self.catalog_url:
            object.__setattr__(self, "catalog_url", f"sqlite:///{self.workspace / 'catalog.db'}")
        return self

    # Derived names and paths: computed, never stored, so they cannot drift apart.
    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or f"flywheel-{self.project}"

    @property
    def registered_model_name(self) -> str:
        return self.mlflow.registered_model or f"flywheel-{self.project}"

    @property
    def labelstudio_project_title(self) -> str:
        return self.label_studio.project_title or f"flywheel-{self.project}"

    @property
    def dirs(self) -> WorkspaceDirs:
        return WorkspaceDirs.under(self.workspace)


SECRET_NAMES = ("password", "token", "secret", "access_key", "secret_key")


def secret_settings() -> list[str]:
    """Dotted names of every SecretStr setting ("label_studio.token", ...)."""
    return [
        f"{section}.{name}"
        for section, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        for name, inner in field.annotation.model_fields.items()
        if inner.annotation is SecretStr
    ]


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning pydantic's validation error into one naming the setting, its environment
    variable and the allowed values (or known names). Refused with the same kind of message: a FLYWHEEL_*
    variable that names no setting, a FLYWHEEL_CONFIG file that does not exist, and a secret in the TOML
    file (a password inside a URL included: secrets come from the environment or Prefect Secret blocks);
    a secret's rejected value is never echoed."""
    import tomllib

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from flywheel.errors import ConfigError

    toml_file = _settings_file()
    try:
        _refuse_unknown_variables(os.environ)
        _refuse_secrets_in(toml_file)
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{toml_file.absolute()}: invalid TOML: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {'; '.join(_explain(err) for err in exc.errors())}") from exc
    except SettingsError as exc:  # a dict setting whose variable is not JSON
        raise ConfigError(f"invalid settings: {_not_json(exc)}") from exc


def _settings_file() -> Path:
    """flywheel.toml in the working directory (optional), or the file FLYWHEEL_CONFIG names (which must exist)."""
    from flywheel.errors import ConfigError

    named = os.environ.get("FLYWHEEL_CONFIG")
    if named is None:
        return Path("flywheel.toml")
    if not Path(named).is_file():
        raise ConfigError(f"FLYWHEEL_CONFIG={named}: no such file (unset it to read ./flywheel.toml if present)")
    return Path(named)


def setting_variables() -> list[str]:
    """Every environment variable that sets something: FLYWHEEL_<NAME> and FLYWHEEL_<SECTION>__<NAME>."""
    names = []
    for name, field in Settings.model_fields.items():
        names.append(_env_name((name,)))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [_env_name((name, inner)) for inner in field.annotation.model_fields]
    return names


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """A misspelled variable would otherwise be ignored without a word (pydantic-settings skips it)."""
    from flywheel.errors import ConfigError

    known = set(setting_variables())
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in known or name in NOT_SETTINGS:
            continue
        if name.startswith(NOT_SETTINGS_PREFIX):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; see flywheel/config.py for the settings"
        raise ConfigError(f"{variable} is set in the environment but names no setting{hint}")


def _not_json(exc: Exception) -> str:
    """A pydantic-settings parse error (it names the field) as: which variable must be JSON, and why it is not."""
    match = re.search(r'field "(\w+)"', str(exc))
    variable = _env_name((match.group(1),)) if match else "a FLYWHEEL_* variable"
    example = '\'{"label_studio.token": "ls-token"}\''
    return f"{variable} must be JSON ({exc.__cause__ or exc}), e.g. {variable}={example}"


# user:password@ in a URL (database and store URLs): a secret, whatever the key is called.
_PASSWORD_IN_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:[^/@]+@")


def _refuse_secrets_in(toml_file: Path) -> None:
    import tomllib

    from flywheel.errors import ConfigError

    if not toml_file.is_file():
        return
    pending: list[tuple[tuple[str, ...], dict[str, Any]]] = [((), tomllib.loads(toml_file.read_text()))]
    while pending:
        prefix, table = pending.pop()
        for key, value in table.items():
            if isinstance(value, dict):
                pending.append(((*prefix, key), value))
                continue
            in_url = isinstance(value, str) and _PASSWORD_IN_URL.match(value) is not None
            if (key in SECRET_NAMES and value) or in_url:
                name = ".".join((*prefix, key))
                what = "holds a password in its URL" if in_url else "is a secret"
                raise ConfigError(
                    f"{toml_file.absolute()}: {name} {what} and must not be in a file; set "
                    f"{_env_name((*prefix, key))} in the environment or use a Prefect Secret block"
                )


def _env_name(loc: tuple[object, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc)


def _explain(err: ErrorDetails) -> str:
    """One pydantic error as 'name: message[, got value][; known names: ...] (env ENV_NAME)'."""
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    text = f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Settings
        for part in loc[:-1]:
            annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            model = annotation
        text += f"; known names here: {', '.join(sorted(model.model_fields))}"
    elif loc and str(loc[-1]) not in SECRET_NAMES and not isinstance(err.get("input"), dict):
        text += f", got {err.get('input')!r}"
    return f"{text} (env {_env_name(loc)})" if loc else text
