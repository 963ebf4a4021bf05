"""The deployment files of infra/ hold together: one image, real entry points and configs, the
config's schedule, token authentication everywhere, and no secret values anywhere."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
NIGHTLY_CONFIG = REPO / "configs" / "landcover-nightly.yaml"
MANIFESTS = sorted(INFRA.rglob("*.yaml"))
SINGLE = INFRA / "single-machine"
TOKEN_SECRET = "geoseg-ray-token"
# Environment variables that carry credentials: only ever from a Secret.
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    return docs


def _all_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in MANIFESTS:
        for doc in _docs(path):
            yield path, doc


def _of_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    found = [(p, d) for p, d in _all_docs() if d.get("kind") == kind]
    assert found, f"no {kind} manifest under {INFRA}"
    return found


def _dicts(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dicts(item)


def _image_name() -> str:
    """The image name, kept in one place: the io.geoseg.image LABEL of infra/Dockerfile."""
    match = re.search(r'io\.geoseg\.image="([^"]+)"', (INFRA / "Dockerfile").read_text())
    assert match, "infra/Dockerfile has no io.geoseg.image LABEL"
    return match.group(1)


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = pod_template["spec"]["containers"]
    assert containers
    return containers


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_env(env: dict[str, dict[str, Any]], where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert ref.get("name") == TOKEN_SECRET and ref.get("key"), f"{where}: RAY_AUTH_TOKEN"


def _check_cluster_spec(spec: dict[str, Any], where: str, *, token_in_env: bool) -> None:
    """Head plus a CPU and a GPU worker group (GPU from zero), autoscaling, ClusterIP, token."""
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service"
    assert not head.get("enableIngress", False), f"{where}: head ingress"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling"
    groups = spec["workerGroupSpecs"]

    def gpus(group: dict[str, Any]) -> int:
        limits = [c.get("resources", {}).get("limits", {}) for c in _containers(group["template"])]
        return sum(int(lim.get("nvidia.com/gpu", 0)) for lim in limits)

    gpu_groups = [g for g in groups if gpus(g) > 0]
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"
    assert [g for g in groups if gpus(g) == 0], f"{where}: no CPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0, f"{where}: GPU group {group['groupName']} minReplicas"
        assert group["maxReplicas"] > 0
    if token_in_env:
        _assert_token_env(_env(_containers(head["template"])[0]), f"{where} head")
        for group in groups:
            for container in _containers(group["template"]):
                _assert_token_env(_env(container), f"{where} group {group['groupName']}")
        auto_env = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
        _assert_token_env(auto_env, f"{where} autoscaler")
    else:
        # KubeRay's authOptions: the operator sets the variables in every Ray container.
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: authOptions"


def _nightly_schedule() -> dict[str, Any]:
    if not NIGHTLY_CONFIG.is_file():
        pytest.skip(f"{NIGHTLY_CONFIG} is not there yet: nothing to compare the schedules with")
    schedule: dict[str, Any] = yaml.safe_load(NIGHTLY_CONFIG.read_text())["schedule"]
    return schedule


def _crontab_entries() -> list[str]:
    lines = (SINGLE / "crontab").read_text().splitlines()
    return [
        line
        for line in lines
        if line.strip()
        and not line.lstrip().startswith("#")
        and not re.match(r"^[A-Z_]+=", line)  # environment settings (SHELL=, CRON_TZ=)
    ]


def test_every_manifest_parses_and_names_its_kind() -> None:
    assert MANIFESTS, f"no YAML under {INFRA}"
    for path, doc in _all_docs():
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), path


def test_raycluster() -> None:
    for path, doc in _of_kind("RayCluster"):
        assert doc["apiVersion"] == "ray.io/v1"
        _check_cluster_spec(doc["spec"], str(path), token_in_env=True)
        params = doc["spec"]["headGroupSpec"]["rayStartParams"]
        # 0.0.0.0 inside the pod is what lets the ClusterIP service reach the dashboard.
        assert params.get("dashboard-host") == "0.0.0.0"


def test_rayjob() -> None:
    for path, doc in _of_kind("RayJob"):
        spec = doc["spec"]
        assert doc["apiVersion"] == "ray.io/v1"
        assert spec["entrypoint"].startswith("python jobs/"), path
        assert spec["shutdownAfterJobFinishes"] is True, path
        assert "rayClusterSpec" in spec or "clusterSelector" in spec, path
        if "rayClusterSpec" in spec:
            _check_cluster_spec(spec["rayClusterSpec"], str(path), token_in_env=False)


def test_raycronjob() -> None:
    for path, doc in _of_kind("RayCronJob"):
        spec = doc["spec"]
        assert doc["apiVersion"] == "ray.io/v1"
        # The fields of KubeRay's RayCronJobSpec: schedule, jobTemplate (a RayJob spec), suspend.
        assert set(spec) <= {"schedule", "jobTemplate", "suspend"}, path
        job = spec["jobTemplate"]
        assert job["entrypoint"].startswith("python jobs/"), path
        assert job["shutdownAfterJobFinishes"] is True, path
        _check_cluster_spec(job["rayClusterSpec"], str(path), token_in_env=False)


def test_cronjob() -> None:
    for path, doc in _of_kind("CronJob"):
        spec = doc["spec"]
        assert doc["apiVersion"] == "batch/v1"
        assert spec["concurrencyPolicy"] == "Forbid", path
        assert isinstance(spec["startingDeadlineSeconds"], int), path
        assert spec["startingDeadlineSeconds"] > 0
        pod = spec["jobTemplate"]["spec"]["template"]
        assert pod["spec"]["restartPolicy"] in {"Never", "OnFailure"}
        (container,) = _containers(pod)
        assert container["command"] == ["python", "jobs/nightly_landcover.py"]
        env = _env(container)
        # A pod that is no Ray node joins the RayCluster's head service through Ray Client.
        assert env["RAY_ADDRESS"]["value"].startswith("ray://geoseg-head-svc"), path
        _assert_token_env(env, f"{path} container")


def test_schedules_equal_the_configs() -> None:
    schedule = _nightly_schedule()
    cron, tz = schedule["cron"], schedule.get("timezone", "UTC")
    for _path, doc in _of_kind("RayCronJob") + _of_kind("CronJob"):
        assert doc["spec"]["schedule"] == cron
    for _path, doc in _of_kind("CronJob"):
        assert doc["spec"]["timeZone"] in {tz, f"Etc/{tz}"}
    (entry,) = _crontab_entries()
    assert " ".join(entry.split()[:5]) == cron
    minute, hour, *daily = cron.split()
    assert daily == ["*", "*", "*"], f"systemd comparison written for daily schedules, not {cron}"
    timer = (SINGLE / "geoseg-nightly.timer").read_text()
    assert f"OnCalendar=*-*-* {int(hour):02d}:{int(minute):02d}:00 {tz}\n" in timer
    assert "Persistent=true\n" in timer


def test_every_image_is_the_dockerfiles() -> None:
    image = _image_name()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image.endswith(f":{version}"), f"{image} is not tagged with geoseg's version {version}"
    for path in MANIFESTS:
        images = [d["image"] for doc in _docs(path) for d in _dicts(doc) if "image" in d]
        assert images, f"{path}: no container image"
        assert set(images) == {image}, path


def test_entry_points_and_configs_named_exist() -> None:
    named: set[str] = set()
    for path in INFRA.rglob("*"):
        if path.is_file():
            named |= set(re.findall(r"\b(?:jobs/\w+\.py|configs/[\w./-]+\.yaml)", path.read_text()))
    assert {"jobs/segment_bucket.py", "jobs/nightly_landcover.py"} <= named
    assert "configs/landcover-nightly.yaml" in named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"named in infra/ but not in the repository: {missing}"


def test_no_secret_values() -> None:
    for path, doc in _all_docs():
        assert doc["kind"] != "Secret", f"{path}: Secrets are created by hand (infra/README.md)"
        for mapping in _dicts(doc):
            is_env = "name" in mapping and ("value" in mapping or "valueFrom" in mapping)
            if is_env and SECRET_ENV.search(mapping["name"]):
                assert "value" not in mapping, f"{path}: {mapping['name']} has a value"
                assert "secretKeyRef" in mapping["valueFrom"], f"{path}: {mapping['name']}"
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            # A token is a long random string; a bearer header would carry one.
            assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{path}: looks like a token"
            assert not re.search(r"Bearer [\w.-]{8,}", text), f"{path}: a bearer token"
    dockerfile = (INFRA / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if re.match(r"\s*(ENV|ARG)\b", line):
            assert not SECRET_ENV.search(line), f"infra/Dockerfile bakes in {line.strip()}"


def test_dockerfile_copies_what_exists_and_what_the_context_sends() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    sent = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [s for sources in copies for s in sources if not s.startswith("--")]
    assert {"pyproject.toml", "constraints.txt", "geoseg/", "jobs/", "configs/"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert source.rstrip("/") in sent, f"COPY {source}: excluded by Dockerfile.dockerignore"
    assert re.search(r"^USER (?!root\b|0\b)\S+", dockerfile, re.MULTILINE), "runs as root"
    assert "WORKDIR /app" in dockerfile
    assert "torch==2.13.0+cpu" in (REPO / "constraints.txt").read_text()


def test_crontab_line() -> None:
    field_ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    (entry,) = _crontab_entries()
    *fields, command = entry.split(maxsplit=5)
    assert len(fields) == 5, entry
    for field, (low, high) in zip(fields, field_ranges, strict=True):
        for part in field.split(","):
            base, _, step = part.partition("/")
            assert not step or step.isdigit(), f"{field}: bad step"
            if base == "*":
                continue
            bounds = [int(b) for b in base.split("-")]
            assert len(bounds) in {1, 2} and all(low <= b <= high for b in bounds), field
    assert "flock -n" in command
    assert "%" not in command  # cron turns an unescaped % into a newline
    assert re.search(r">>\s*\S+ 2>&1$", command), "the run's output goes to a log file"
    assert "jobs/nightly_landcover.py" in command


def test_systemd_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = [SINGLE / "geoseg-nightly.service", SINGLE / "geoseg-nightly.timer"]
    for unit in units:
        shutil.copy(unit, tmp_path / unit.name)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(u.name for u in units)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify only warns (exit 0) about unknown keys and unparsable values: stderr must be empty.
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr
    service = units[0].read_text()
    assert "Type=oneshot\n" in service and "SuccessExitStatus=3\n" in service
