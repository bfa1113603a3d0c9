"""The deployment files, checked offline: hadolint on the Dockerfile, the compose file against the Compose
specification, every Kubernetes manifest (the kustomize base and the example overlay, rendered) against
the Kubernetes schemas, and the RayService's Serve config against the Ray application."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from conftest import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}


def hadolint() -> str:
    binary = Path(sys.executable).parent / "hadolint"
    return str(binary) if binary.exists() else "hadolint"


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\nCMD python app.py\n")
    assert subprocess.run([hadolint(), str(bad)], capture_output=True, check=False).returncode != 0


def test_dockerfile_runs_taskmoe_as_non_root_with_volumes_and_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["taskmoe", "serve"]' in text
    assert re.search(r'^VOLUME \["/models", "/patterns"\]', text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert "ARG FLAVOUR=cuda" in text and "FROM base-${FLAVOUR}" in text
    ignored = (ROOT / ".dockerignore").read_text()
    assert "!server/" in ignored and "!pattern_store/" in ignored and "\n*\n" in f"\n{ignored}"
    assert "!requirements/" in ignored


def pip_installs_off_the_lock(dockerfile: str) -> list[str]:
    """Every `pip install` of a Dockerfile that the copied lock does not constrain."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    commands = re.split(r"&&|;|\n(?!\s)", "\n".join(lines).replace("\\\n", " "))
    installs = [command.strip() for command in commands if re.search(r"\bpip3? install\b", command)]
    return [command for command in installs if "--constraint requirements.lock" not in command]


def test_dockerfile_installs_every_package_from_its_flavours_lock() -> None:
    text = DOCKERFILE.read_text()
    assert "COPY requirements/${FLAVOUR}.txt ./requirements.lock" in text
    assert "pip install --constraint requirements.lock" in text and pip_installs_off_the_lock(text) == []
    flavours = re.findall(r"^FROM base AS base-(\w+)$", text, re.M)
    assert sorted(flavours) == ["cpu", "cuda"]
    assert all((ROOT / "requirements" / f"{flavour}.txt").is_file() for flavour in flavours)
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in text  # the CPU lock's torch+cpu


def test_an_install_off_the_lock_is_caught() -> None:
    good = "RUN pip install --constraint requirements.lock pip \\\n"
    good += "    && pip install --constraint requirements.lock .\n"
    assert pip_installs_off_the_lock(good) == []
    for bad in ("RUN pip install torch==2.13.0\n", good.replace(" .", " . \\\n    && pip install flask")):
        assert pip_installs_off_the_lock(bad), bad


def interpolate(text: str, environment: dict[str, str]) -> str:
    """Compose's `${VAR}` and `${VAR:-default}` substitution, as `docker compose` does before validating."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return environment.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", substitute, text)


def test_compose_file_is_valid_and_reserves_a_gpu() -> None:
    text = interpolate((ROOT / "docker" / "compose.yaml").read_text(), {})
    compose = PyCompose.from_yaml(text).to_dict()
    service = compose["services"]["taskmoe"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    targets = {volume["target"]: volume for volume in service["volumes"]}
    assert targets["/models"].get("read_only") is True and "/patterns" in targets
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / "docker" / yaml.safe_load(text)["services"]["taskmoe"]["volumes"][0]["source"]).is_dir()


def test_compose_validation_rejects_a_broken_file() -> None:
    with pytest.raises(ValueError):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    ports: [{target: not-a-port}]\n")


# -- Kubernetes -------------------------------------------------------------------------------------


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes' strategic merge for what the overlay patches: maps merge, lists of named maps merge
    by name, anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        merged = [copy.deepcopy(item) for item in base]
        names = [item.get("name") for item in merged]
        for item in patch:
            if item["name"] in names:
                index = names.index(item["name"])
                merged[index] = strategic_merge(merged[index], item)
            else:
                merged.append(item)
        return merged
    return patch


def env_file(directory: Path, name: str) -> dict[str, str]:
    path = directory / name
    if not path.exists():
        path = directory / f"{name}.example"  # the real one holds a secret and stays out of git
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize` makes of the features these kustomizations use (no name hashes)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        documents += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for label in spec.get("labels", []):
        for document in documents:
            document.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
            if label.get("includeSelectors") and document["kind"] == "Deployment":
                document["spec"]["selector"]["matchLabels"].update(label["pairs"])
                document["spec"]["template"]["metadata"]["labels"].update(label["pairs"])
            if label.get("includeSelectors") and document["kind"] == "Service":
                document["spec"]["selector"].update(label["pairs"])
    for generator in spec.get("configMapGenerator", []):
        data = dict(item.split("=", 1) for item in generator.get("literals", []))
        existing = [d for d in documents if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]]
        if generator.get("behavior") == "merge":
            assert existing, f"configMapGenerator merges into {generator['name']}, which the base lacks"
            existing[0]["data"].update(data)
        else:
            documents.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}})
            documents[-1]["data"] = data
    for generator in spec.get("secretGenerator", []):
        data = {}
        for name in generator.get("envs", []):
            data.update(env_file(directory, name))
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]}, "stringData": data}
        documents.append(secret)
    for patch_spec in spec.get("patches", []):
        patch = yaml.safe_load((directory / patch_spec["path"]).read_text())
        targets = [
            i
            for i, d in enumerate(documents)
            if d["kind"] == patch["kind"] and d["metadata"]["name"] == patch["metadata"]["name"]
        ]
        assert len(targets) == 1, f"patch {patch_spec['path']} matches {len(targets)} resources"
        documents[targets[0]] = strategic_merge(documents[targets[0]], patch)
    for image in spec.get("images", []):
        for document in documents:
            for container in document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                repository = container["image"].rsplit(":", 1)[0]
                if repository == image["name"]:
                    container["image"] = f"{repository}:{image['newTag']}"
    if "namespace" in spec:
        for document in documents:
            if document["kind"] not in CLUSTER_SCOPED:
                document["metadata"]["namespace"] = spec["namespace"]
    return documents


def validate(documents: list[dict[str, Any]]) -> None:
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


@pytest.mark.parametrize("directory", [K8S / "base", K8S / "overlays" / "example"], ids=["base", "example"])
def test_manifests_are_valid_kubernetes(directory: Path) -> None:
    documents = render(directory)
    validate(documents)
    (deployment,) = by_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/patterns" in mounts
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    pvcs = {claim["metadata"]["name"] for claim in by_kind(documents, "PersistentVolumeClaim")}
    assert set(claims.values()) <= pvcs
    admin_key = next(e for e in container["env"] if e["name"] == "TASKMOE_ADMIN_KEY")["valueFrom"]["secretKeyRef"]
    assert admin_key["name"] == "taskmoe-admin"
    (service,) = by_kind(documents, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_example_overlay_sizes_memory_from_its_budget_and_supplies_the_secret() -> None:
    documents = render(K8S / "overlays" / "example")
    (config,) = by_kind(documents, "ConfigMap")
    assert config["data"]["TASKMOE_CACHE_BUDGET"] == "56GiB"
    (secret,) = by_kind(documents, "Secret")
    assert secret["metadata"]["name"] == "taskmoe-admin" and "admin-key" in secret["stringData"]
    (deployment,) = by_kind(documents, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "48Gi" and container["image"].endswith(":0.1.0-cuda")
    assert all(d["metadata"].get("namespace") == "taskmoe" for d in documents if d["kind"] != "Namespace")
    assert "admin.env" in (ROOT / ".gitignore").read_text()


def test_schema_validation_catches_a_broken_manifest() -> None:
    documents = render(K8S / "base")
    (deployment,) = by_kind(documents, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate([deployment])


# -- Ray --------------------------------------------------------------------------------------------


def test_rayservice_serves_the_ray_application() -> None:
    service = yaml.safe_load((ROOT / "deploy" / "ray" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, builder = application["import_path"].partition(":")
    source = (ROOT / "deploy" / "ray" / f"{module}.py").read_text()
    assert f"def {builder}(args: dict[str, str])" in source
    assert {"model", "store", "replicas", "gpus"} <= set(application["args"])
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_dockerfile_ships_the_ray_application_for_the_rayservice_image() -> None:
    text = DOCKERFILE.read_text()
    assert "COPY deploy/ray ./deploy/ray" in text and "PYTHONPATH=/opt/taskmoe-src/deploy/ray" in text
    assert os.path.exists(ROOT / "deploy" / "ray" / "taskmoe_ray.py")
