"""Static checks of the team stack: docker-compose.yml, .env.example, infra/Dockerfile, infra/*.sh.

Docker is not available on the CI machine, so these tests read the files the way compose would: YAML with merge
keys, ``${VAR}`` / ``${VAR:-default}`` / ``${VAR:?error}`` interpolation, ``$$`` escapes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "infra" / "Dockerfile"

EXPECTED_SERVICES = {
    "postgres",
    "minio",
    "minio-buckets",
    "mlflow",
    "prefect-server",
    "prefect-worker",
    "ray-head",
    "ray-worker",
}
#: Services that run once and exit (no healthcheck, waited on with service_completed_successfully).
ONE_SHOT = {"minio-buckets"}

_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", re.IGNORECASE)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (the subset the file uses)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", "-"):
            return value if value else (arg or "")
        if op in (":?", "?"):
            if not value:
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(sub, text).replace("$$", "$")


def walk_strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (walk_strings(k) + walk_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in walk_strings(v)]
    return []


def env_example() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert "=" in line, f".env.example: line {line!r} is not KEY=VALUE"
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), (
        "docker-compose.yml has no services"
    )
    return doc


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_expected_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


def test_every_service_has_an_image_or_a_buildable_dockerfile(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"
        build = svc.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            assert (context / dockerfile).is_file(), f"service {name}: {context / dockerfile} does not exist"
        if "image" in svc:
            image = interpolate(svc["image"], {})
            assert image and ":" in image, f"service {name}: image {image!r} has no tag"
            assert not image.endswith(":latest"), f"service {name}: pin the image instead of {image!r}"


def test_ports_are_bound_to_localhost_by_default(compose: dict[str, Any]) -> None:
    published = 0
    for name, svc in compose["services"].items():
        for spec in svc.get("ports", []):
            assert isinstance(spec, str), (
                f"service {name}: use the short 'HOST_IP:HOST:CONTAINER' port syntax"
            )
            assert "${BIND_ADDRESS:-127.0.0.1}" in spec, f"service {name}: port {spec!r} ignores BIND_ADDRESS"
            host_ip, host_port, container_port = interpolate(spec, {}).split(":")
            assert host_ip == "127.0.0.1", f"service {name}: port {spec!r} binds {host_ip!r} by default"
            assert host_port.isdigit() and container_port.isdigit()
            # ... and BIND_ADDRESS really moves it.
            assert interpolate(spec, {"BIND_ADDRESS": "0.0.0.0"}).startswith("0.0.0.0:")
            published += 1
    assert published >= 4  # Prefect, MLflow, Ray dashboard, MinIO console


def test_ui_ports_match_the_docs(compose: dict[str, Any]) -> None:
    def container_ports(name: str) -> set[int]:
        return {int(interpolate(p, {}).split(":")[-1]) for p in compose["services"][name].get("ports", [])}

    assert 4200 in container_ports("prefect-server")
    assert 5000 in container_ports("mlflow")
    assert 8265 in container_ports("ray-head")
    assert 9001 in container_ports("minio")
    assert not container_ports("postgres"), "Postgres must not be published"


def test_referenced_variables_are_documented_in_env_example(compose: dict[str, Any]) -> None:
    documented = env_example()
    referenced = {m.group(1) for s in walk_strings(compose) for m in _VAR.finditer(s)}
    assert referenced, "docker-compose.yml references no variables"
    missing = sorted(referenced - set(documented))
    assert not missing, f"variables used in docker-compose.yml but missing from .env.example: {missing}"


def test_secrets_come_from_env_and_are_required(compose: dict[str, Any]) -> None:
    documented = env_example()
    text = COMPOSE.read_text()
    secret_vars = sorted(k for k in documented if _SECRET_NAME.search(k) and k != "RAY_AUTH_MODE")
    assert "POSTGRES_PASSWORD" in secret_vars and "MINIO_ROOT_PASSWORD" in secret_vars
    for var in secret_vars:
        assert documented[var] == "", f".env.example must not carry a value for the secret {var}"
        uses = re.findall(r"(?<!\$)\$\{" + var + r"([^}]*)\}", text)
        assert uses, f"{var} is documented but never used"
        for suffix in uses:
            assert suffix.startswith(":?"), (
                f"${{{var}{suffix}}}: a secret must be required (:?), not defaulted"
            )
        with pytest.raises(KeyError):
            interpolate("${" + var + uses[0] + "}", {})


def test_no_literal_passwords(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in service_env(svc).items():
            if _SECRET_NAME.search(key) or key in ("AWS_ACCESS_KEY_ID", "MINIO_ROOT_USER"):
                assert value.startswith("${") and value.endswith("}"), f"service {name}: {key} is a literal"
    for s in walk_strings(compose):
        for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", s):
            assert user.startswith(("${", "$$")), f"literal user in URL {s!r}"
            assert password.startswith(("${", "$$")), f"literal password in URL {s!r}"


def test_depends_on_targets_exist_and_are_checkable(compose: dict[str, Any]) -> None:
    services = compose["services"]
    seen_conditions = set()
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            assert dep in services, f"service {name} depends on unknown service {dep!r}"
            condition = (spec or {}).get("condition", "service_started")
            seen_conditions.add(condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep} to be healthy; {dep} has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert dep in ONE_SHOT and "restart" not in services[dep], f"{dep} is not a one-shot service"
    assert "service_healthy" in seen_conditions


def test_long_running_services_restart_and_have_healthchecks(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name in ONE_SHOT:
            continue
        assert "healthcheck" in svc, f"service {name} has no healthcheck"
        test = svc["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), (
            f"service {name}: bad healthcheck {test}"
        )
        assert svc.get("restart") == "unless-stopped", f"service {name} does not restart"


def test_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set((compose.get("volumes") or {}).keys())
    used = set()
    for name, svc in compose["services"].items():
        for spec in svc.get("volumes", []):
            source = interpolate(spec, {}).split(":")[0]
            if source.startswith((".", "/")):
                if "${" not in spec.split(":")[0]:  # a user-configured data folder need not exist here
                    assert (REPO / source).exists(), f"service {name}: bind mount {source} does not exist"
            else:
                assert source in declared, (
                    f"service {name}: volume {source!r} is not declared at the top level"
                )
                used.add(source)
    assert {"postgres-data", "minio-data", "runs"} <= used
    assert not declared - used, f"declared but unused volumes: {declared - used}"


def test_postgres_init_creates_both_databases(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    mounts = [v for v in pg["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert len(mounts) == 1
    script = REPO / mounts[0].split(":")[0]
    text = script.read_text()
    assert "CREATE DATABASE" in text and "$PREFECT_DB" in text and "$MLFLOW_DB" in text
    env = service_env(pg)
    assert "PREFECT_DB" in env and "MLFLOW_DB" in env
    prefect_url = service_env(compose["services"]["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_url = service_env(compose["services"]["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert prefect_url.startswith("postgresql+asyncpg://") and "${PREFECT_DB" in prefect_url
    assert mlflow_url.startswith("postgresql") and "${MLFLOW_DB" in mlflow_url


def test_mlflow_serves_artifacts_from_the_minio_bucket(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"]) if isinstance(mlflow["command"], list) else mlflow["command"]
    assert "--serve-artifacts" in command and "--artifacts-destination" in command
    env = service_env(mlflow)
    assert interpolate(env["MLFLOW_ARTIFACTS_DESTINATION"], {}) == "s3://mlflow/"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    buckets = " ".join(walk_strings(compose["services"]["minio-buckets"]))
    assert "mc mb" in buckets and "$$MLFLOW_BUCKET" in buckets
    assert service_env(compose["services"]["minio-buckets"])["MLFLOW_BUCKET"] == env_var_ref(
        "MLFLOW_BUCKET", compose
    )


def env_var_ref(var: str, compose: dict[str, Any]) -> str:
    refs = {s for s in walk_strings(compose) if s.startswith("${" + var)}
    assert len(refs) == 1, f"{var} is referenced with different defaults: {refs}"
    return refs.pop()


def test_worker_serves_the_deployment_from_the_pool_in_prefect_yaml(compose: dict[str, Any]) -> None:
    worker = compose["services"]["prefect-worker"]
    env = service_env(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    command = worker["command"]
    script_in_image = next(c for c in command if c.endswith(".sh"))
    assert script_in_image.startswith("/app/")
    script = REPO / script_in_image.removeprefix("/app/")
    assert script.is_file()
    text = script.read_text()
    deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    pool = deployment["work_pool"]["name"]
    assert f"POOL={pool}" in text and "--type process" in text
    assert "prefect --no-prompt deploy --all" in text and 'prefect worker start --pool "$POOL"' in text


def test_ray_nodes_share_the_run_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        assert "runs:/app/runs" in services[name]["volumes"], f"{name} does not mount the run directories"
    head = " ".join(services["ray-head"]["command"])
    assert "--head" in head and "--dashboard-port 8265" in head and "--dashboard-host 0.0.0.0" in head
    assert "--address ray-head:6379" in " ".join(services["ray-worker"]["command"])


def test_dockerfile_installs_cpu_torch_before_the_package() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    torch_line = next(i for i, line in enumerate(lines) if "torch==" in line)
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    package_line = next(i for i, line in enumerate(lines) if re.search(r"pip install \.(\s|$)", line))
    assert torch_line < package_line
    pinned = re.search(r"torch==([0-9.]+)", lines[torch_line]).group(1)
    pyproject = (REPO / "pyproject.toml").read_text()
    lower, upper = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', pyproject).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(lower) <= as_tuple(pinned) < as_tuple(upper), f"torch {pinned} outside pyproject's range"


def test_dockerfile_copies_only_existing_sources_and_ignore_file_keeps_them() -> None:
    text = DOCKERFILE.read_text()
    sources = []
    for m in re.finditer(r"^COPY\s+(.+?)\s+\S+\s*$", text, flags=re.MULTILINE):
        sources += m.group(1).split()
    assert sources
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert f"!{src.rstrip('/')}" in [line.rstrip("/") for line in ignore], (
            f"{src} is excluded by .dockerignore"
        )


@pytest.mark.parametrize("script", sorted((REPO / "infra").rglob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    shell = "bash" if script.read_text().startswith("#!/usr/bin/env bash") else "sh"
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is not installed")
    done = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, f"{script}: {done.stderr}"
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


def test_mlflow_uses_its_own_minio_user_not_the_root_credentials(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mlflow_env = service_env(services["mlflow"])
    assert "MINIO_ROOT" not in mlflow_env["AWS_ACCESS_KEY_ID"] + mlflow_env["AWS_SECRET_ACCESS_KEY"]
    assert mlflow_env["AWS_ACCESS_KEY_ID"] == env_var_ref("MLFLOW_S3_USER", compose)
    assert "${MLFLOW_S3_PASSWORD:?" in mlflow_env["AWS_SECRET_ACCESS_KEY"]
    script = " ".join(walk_strings(services["minio-buckets"]["command"]))
    # the user exists, and its policy names the artifact bucket and nothing else
    assert 'mc admin user add pkdot "$$MLFLOW_S3_USER" "$$MLFLOW_S3_PASSWORD"' in script
    assert "mc admin policy attach pkdot mlflow-artifacts --user" in script
    resources = re.findall(r'"Resource": \[([^\]]*)\]', script)
    assert resources and all("$$MLFLOW_BUCKET" in r for r in resources), resources
    assert '"s3:*"' not in script and '"Resource": ["*"]' not in script


def test_compose_file_validates_with_docker_compose(tmp_path: Path) -> None:
    """``docker compose config`` (v2) or, where only Debian's ``docker-compose`` 1.29 exists, its config check
    on a copy without the top-level ``name`` (a v2 key that 1.29 does not know). ``.ci/run`` installs the
    latter when neither is present."""
    env_file = tmp_path / ".env"
    values = {k: (v or f"test-{k.lower()}") for k, v in env_example().items()}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    v2 = (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )
    if v2:
        cmd = ["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"]
    elif shutil.which("docker-compose"):
        copy = REPO / f".compose-check-{tmp_path.name}.yml"  # same folder: relative bind mounts resolve alike
        copy.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text()))
        cmd = ["docker-compose", "--env-file", str(env_file), "-f", str(copy), "config", "-q"]
    else:
        pytest.fail(
            "neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)"
        )
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    finally:
        if not v2:
            copy.unlink(missing_ok=True)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stdout}{done.stderr}"
    # ... and it really checks: an unknown key in a service is rejected
    if not v2:
        bad = REPO / f".compose-bad-{tmp_path.name}.yml"
        bad.write_text(
            re.sub(r"(?m)^name: .*\n", "", COMPOSE.read_text()).replace(
                "  postgres:\n", "  postgres:\n    nonsense_key: 1\n", 1
            )
        )
        try:
            rejected = subprocess.run(
                ["docker-compose", "--env-file", str(env_file), "-f", str(bad), "config", "-q"],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=120,
            )
        finally:
            bad.unlink(missing_ok=True)
        assert rejected.returncode != 0


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_worker_deploys_once_and_again_only_when_prefect_yaml_changes(tmp_path: Path) -> None:
    """The worker entrypoint with stand-ins for ray/prefect on PATH: the first start creates the pool and deploys,
    a restart does neither (UI edits survive), a changed prefect.yaml deploys again."""
    bin_dir, app, log = tmp_path / "bin", tmp_path / "app", tmp_path / "calls.log"
    bin_dir.mkdir()
    app.mkdir()
    (app / "prefect.yaml").write_text((REPO / "prefect.yaml").read_text())
    state = tmp_path / "state"
    state.mkdir()
    _fake_bin(bin_dir, "ray", f'echo "ray $*" >> {log}\n')
    _fake_bin(
        bin_dir,
        "prefect",
        f"""echo "prefect $*" >> {log}
case "$*" in
  "work-pool inspect"*) [ -f {state}/pool ] ;;
  "work-pool create"*) touch {state}/pool ;;
  "deployment inspect"*) [ -f {state}/deployment ] ;;
  "--no-prompt deploy --all") touch {state}/deployment ;;
  "worker start"*) exit 0 ;;
esac
""",
    )
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PREFECT_API_URL": "http://prefect:4200/api",
        "RAY_HEAD_ADDRESS": "ray-head:6379",
        "PKDOT_APP_DIR": str(app),
        "PKDOT_DEPLOY_STAMP": str(tmp_path / "stamp"),
    }
    script = REPO / "infra" / "worker-entrypoint.sh"

    def start() -> list[str]:
        log.write_text("")
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return log.read_text().splitlines()

    first = start()
    assert "prefect --no-prompt deploy --all" in first
    assert any(c.startswith("prefect work-pool create pkdot-pool") for c in first)
    assert not any("--overwrite" in c for c in first)
    second = start()
    assert "prefect --no-prompt deploy --all" not in second
    assert not any(c.startswith("prefect work-pool create") for c in second)
    assert second[-1].startswith("prefect worker start --pool pkdot-pool")
    (app / "prefect.yaml").write_text((app / "prefect.yaml").read_text() + "# changed\n")
    third = start()
    assert "prefect --no-prompt deploy --all" in third
