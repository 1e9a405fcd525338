"""Deployment definitions without a server: the settings a run gets, schedules, triggers, bad settings, flow
parameter validation, and the docker / kubernetes work-pool templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from flows import deploy
from flows.common import THRESHOLD_REACHED
from flywheel.app.webhook import LABELS_CHANGED
from flywheel.config import load_settings
from flywheel.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parents[2] / "infra" / "work-pools"


def test_settings_env_gives_the_same_settings_back_without_secrets(tmp_path, monkeypatch):
    settings = load_settings(
        workspace=tmp_path,
        project="p1",
        classes=["a", "b"],
        image_size=48,
        label_studio={"port": 18080, "token": "secret-token-123", "password": "secret-pass-456"},
        finetune={"epochs": 1, "backbones": ["efficientnet_lite0"]},
        prefect={"round_cron": "5 4 * * *", "work_pool": "pool-x"},
    )
    env = deploy.settings_env(settings)
    assert "secret-token-123" not in json.dumps(env) and "secret-pass-456" not in json.dumps(env)
    for key in list(__import__("os").environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    again = load_settings()
    assert again.model_dump(exclude={"label_studio": {"token", "password"}}) == settings.model_dump(
        exclude={"label_studio": {"token", "password"}}
    )
    assert again.label_studio.token == SecretStr("flywheel-local-token")  # secrets: the worker's own environment


def test_settings_env_carries_the_backbone_only_when_something_set_it(tmp_path):
    assert "FLYWHEEL_BACKBONE" not in deploy.settings_env(load_settings(workspace=tmp_path))
    chosen = deploy.settings_env(load_settings(workspace=tmp_path, backbone="efficientnet_lite1"))
    assert chosen["FLYWHEEL_BACKBONE"] == "efficientnet_lite1"


def test_build_deployments_per_project_with_schedule_triggers_and_limits(tmp_path):
    settings = load_settings(workspace=tmp_path, project="p2", prefect={"round_cron": "*/30 * * * *"})
    built = {d.name: d for d in deploy.build_deployments(settings, code_dir=Path("/opt/flywheel"))}
    assert sorted(built) == sorted(f"{kind}-p2" for kind in deploy.KINDS)
    assert [s.schedule.cron for s in built["round-p2"].schedules] == ["*/30 * * * *"]
    assert [s.schedule.interval.total_seconds() for s in built["sync-p2"].schedules] == [300]
    [sync_trigger] = built["sync-p2"].triggers
    [finetune_trigger] = built["finetune-p2"].triggers
    assert sync_trigger.expect == {LABELS_CHANGED} and finetune_trigger.expect == {THRESHOLD_REACHED}
    assert finetune_trigger.match.model_dump() == {"prefect.resource.id": "flywheel.project.p2"}
    assert built["finetune-p2"].concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert built["round-p2"].entrypoint == "flows/flywheel_flows.py:round_flow"
    assert built["round-p2"].storage.to_pull_step() == {
        "prefect.deployments.steps.set_working_directory": {"directory": "/opt/flywheel"}
    }


@pytest.mark.parametrize(
    ("prefect", "named"),
    [({"round_cron": "61 * * * *"}, "61 \\* \\* \\* \\*"), ({"timezone": "Mars/Olympus"}, "Mars/Olympus")],
)
def test_a_bad_schedule_names_the_setting(tmp_path, prefect, named):
    settings = load_settings(workspace=tmp_path, prefect=prefect)
    with pytest.raises(ConfigError, match=f"prefect.round_cron .*{named}"):
        deploy.build_deployments(settings)


def test_flow_parameters_are_validated_before_any_work():
    from flows.flywheel_flows import annotate_sim_flow, round_flow

    with pytest.raises(Exception, match="noise_rate") as bound:
        annotate_sim_flow.validate_parameters({"noise_rate": 2.0})
    assert "less than or equal to 1" in str(bound.value)
    with pytest.raises(Exception, match="k_per_round: Input should be greater than or equal to 1"):
        round_flow.validate_parameters({"overrides": {"k_per_round": 0}})
    with pytest.raises(Exception, match="no_such_setting: Extra inputs are not permitted"):
        round_flow.validate_parameters({"overrides": {"no_such_setting": 1}})
    assert round_flow.validate_parameters({"overrides": {"k_per_round": 5}})["overrides"] == {"k_per_round": 5}


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_work_pool_templates_template_only_declared_variables(kind):
    """Every {{ placeholder }} in the job configuration is a declared variable (what the server checks)."""
    import re

    template = json.loads((TEMPLATES / f"{kind}.json").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"{{\s*([a-z_]+)\s*}}", json.dumps(template["job_configuration"])))
    assert used and used <= declared
    env_default = template["variables"]["properties"]["env"]["default"]
    assert env_default["FLYWHEEL_WORKSPACE"].startswith("/")
