"""infra/compose.yaml: loopback-only ports, non-root services, and the environment the code reads."""

from __future__ import annotations

import re
from urllib.parse import urlparse

from infra_helpers import INFRA, code_config_env_names, final_user

PROJECT_IMAGE = "${SSD_IMAGE:-ssd-pipeline:cpu}"
EXPECTED_PUBLISHED = {4200, 8265, 9000, 9001}


def _command_text(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _code_services(compose: dict) -> dict[str, dict]:
    """Services that run project code: the project image, except the Prefect server (API only)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image") == PROJECT_IMAGE and "prefect server start" not in _command_text(service)
    }


def test_stack_has_the_expected_services(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "prefect-worker", "ray-head", "ray-worker", "minio", "minio-init"} <= set(
        services
    )
    assert set(_code_services(compose)) == {"prefect-worker", "ray-head", "ray-worker"}
    # The Prefect server stores its state in PostgreSQL, not SQLite.
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    assert "@postgres:5432/" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]


def test_worker_polls_the_process_pool_the_deployments_use(compose):
    command = _command_text(compose["services"]["prefect-worker"])
    assert re.search(r"prefect worker start --pool ssd-process --type process", command)


def test_published_ports_bind_loopback_only(compose):
    published = set()
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r}"
            published.add(int(port.split(":")[1]))
        assert service.get("network_mode") != "host", name
    assert published == EXPECTED_PUBLISHED


def test_every_service_runs_as_non_root(compose):
    image_user = final_user((INFRA / "Dockerfile").read_text())
    for name, service in compose["services"].items():
        user = str(service.get("user", image_user if service.get("image") == PROJECT_IMAGE else "")).strip()
        assert user, f"{name}: no user set and not the project image"
        assert user.split(":")[0] not in ("root", "0"), f"{name} runs as {user}"
        assert not service.get("privileged"), name


def test_code_services_get_every_config_variable_the_code_reads(compose):
    needed = code_config_env_names() | {"AWS_ENDPOINT_URL", "RAY_ADDRESS", "PREFECT_API_URL"}
    for name, service in _code_services(compose).items():
        missing = needed - set(service.get("environment", {}))
        assert not missing, f"compose service {name} does not set {sorted(missing)}"


def test_addresses_point_at_the_services_that_serve_them(compose):
    services = compose["services"]
    head_command = _command_text(services["ray-head"])
    for name, service in _code_services(compose).items():
        env = service["environment"]
        api = urlparse(env["PREFECT_API_URL"])
        assert (api.hostname, api.port, api.path) == ("prefect-server", 4200, "/api"), name
        assert "--port 4200" in _command_text(services["prefect-server"])
        ray_host, ray_port = env["RAY_ADDRESS"].split(":")
        assert ray_host == "ray-head" and f"--port={ray_port}" in head_command, name
        for variable in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            endpoint = urlparse(env[variable])
            assert (endpoint.hostname, endpoint.port) == ("minio", 9000), name
    assert "ray-head:6379" in _command_text(services["ray-worker"])
    assert "--address=ray-head:6379" in _command_text(services["prefect-worker"])


def test_credentials_come_from_variables_with_only_local_minio_defaults(compose):
    reference = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+)(:-(?P<default>[^}]*))?\}$")
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if not re.search(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN|ROOT_USER", key):
                continue
            if value is None:  # passed through from the shell / env file
                continue
            match = reference.match(str(value))
            assert match, f"{name}.{key} is a literal, not a ${{VAR}} reference"
            assert match["default"] in (None, "minioadmin", "prefect-local-only"), f"{name}.{key}"
    url = compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "${POSTGRES_PASSWORD:-" in url


def test_env_example_documents_every_variable_compose_substitutes(compose):
    lines = (INFRA / "compose.yaml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    substituted = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))
    documented = set(re.findall(r"^#?\s*([A-Z0-9_]+)=", (INFRA / "env.example").read_text(), re.M))
    assert substituted - documented == set(), "add these to infra/env.example"
    assert "${SSD_BUCKET" in text and "mb --ignore-existing" in text


def test_minio_data_is_a_bind_mount_that_git_ignores(compose):
    (volume,) = compose["services"]["minio"]["volumes"]
    assert volume["source"] == "./.data/minio" and volume["bind"]["create_host_path"] is False
    assert ".data/" in (INFRA / ".gitignore").read_text().split()
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_images_are_pinned_and_the_project_image_is_built_here(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        if image == PROJECT_IMAGE:
            assert "build" in service, name
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image}"
    assert compose["x-ssd-image"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert compose["x-ssd-image"]["build"]["context"] == ".."
