"""docker-compose.yml cannot run here (no Docker engine): check it against the compose spec and
check the promises it must keep."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_matches_the_compose_spec() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_has_aof_a_password_and_no_public_port() -> None:
    redis = compose()["services"]["redis"]
    assert "--requirepass" in redis["command"]
    assert "ports" not in redis
    conf = (ROOT / "infra" / "redis.conf").read_text()
    assert "appendonly yes" in conf
    assert "maxmemory-policy noeviction" in conf
    assert "healthcheck" in redis


def test_minio_bucket_is_created_and_workers_wait_for_it() -> None:
    services = compose()["services"]
    assert "mc mb --ignore-existing" in " ".join(services["minio-init"]["command"])
    worker = services["worker-0"]
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gpu_workers_reserve_a_device_and_have_a_healthcheck() -> None:
    worker = compose()["services"]["worker-0"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert worker["healthcheck"]["test"][:3] == ["CMD", "sdfarm", "workers"]
    assert "--check" in worker["healthcheck"]["test"]


def test_scheduler_service_runs_the_dataset_specs() -> None:
    scheduler = compose()["services"]["scheduler"]
    assert scheduler["command"] == ["scheduler"]
    assert scheduler["environment"]["SDFARM_DATASETS_DIR"] == "/datasets"
    assert scheduler["environment"]["SDFARM_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")


def test_every_service_gets_credentials_from_the_environment_not_the_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "${REDIS_PASSWORD:?" in text
    assert "${MINIO_ROOT_PASSWORD:?" in text
    env = compose()["x-sdfarm-env"]
    assert env["SDFARM_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")


def test_flower_runs_on_the_farms_celery_app_behind_a_password_on_loopback() -> None:
    flower = compose()["services"]["flower"]
    assert flower["profiles"] == ["monitoring"]
    script = flower["entrypoint"][-1]
    assert 'test -n "$$FLOWER_BASIC_AUTH" ||' in script  # no login, no start
    assert 'exec celery -A sdfarm.celery_app flower --port=5555 --basic_auth="$$FLOWER_BASIC_AUTH"' in script
    assert flower["ports"] == ["127.0.0.1:5555:5555"]


def test_no_service_of_an_optional_profile_requires_a_variable_of_the_farm() -> None:
    """compose substitutes variables in every service before it applies profiles: a `${X:?}` in the
    monitoring profile would stop `docker compose up` for users who never enable it."""
    def required(services: list[Any]) -> set[str]:
        return set(re.findall(r"\$\{([A-Z_]+):\?", yaml.safe_dump(services)))

    services = compose()["services"].values()
    always = required([s for s in services if not s.get("profiles")])
    assert {"REDIS_PASSWORD", "MINIO_ROOT_PASSWORD"} <= always
    assert required([s for s in services if s.get("profiles")]) <= always


def test_the_api_serves_on_loopback_with_a_readiness_healthcheck_and_no_required_token() -> None:
    api = compose()["services"]["api"]
    assert api["command"][0] == "serve"
    assert api["ports"] == ["127.0.0.1:8000:8000"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["environment"]["SDFARM_API_TOKENS"] == "${SDFARM_API_TOKENS:-}"  # unset: everything refused
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    # the registry the shared environment names (SDFARM_MODELS_FILE) is mounted where it says
    models_file = compose()["x-sdfarm-env"]["SDFARM_MODELS_FILE"]
    assert any(v.split(":")[1] == str(Path(models_file).parent) for v in api["volumes"])
