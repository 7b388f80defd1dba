"""KubeRay manifests, the Prefect Kubernetes work pool and the Helm values: security, wiring, versions."""

from __future__ import annotations

import shlex
from copy import deepcopy
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from infra_helpers import INFRA, REPO, S3_SECRET_KEYS, code_config_env_names, lock_versions, pod_specs
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.templating import apply_values
from prefect.workers.base import BaseJobConfiguration

PROJECT_VERSION = "0.1.0"
# Inside Ray pods the job system hands the entrypoint driver its RAY_ADDRESS; no manifest sets it.
SET_BY_RAY_IN_RAY_PODS = {"RAY_ADDRESS"}


def _by_kind(documents, kind):
    return [doc for doc in documents if doc.get("kind") == kind]


def _render_work_pool(template: dict, overrides: dict) -> dict:
    """The job configuration a Prefect worker would build: variable defaults, then deployment overrides."""
    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    values.update(overrides)
    return apply_values(deepcopy(template["job_configuration"]), values)


def _all_pods(k8s_documents, work_pool_template):
    pods = []
    for doc in _by_kind(k8s_documents, "RayCluster") + _by_kind(k8s_documents, "RayJob"):
        for label, spec in pod_specs(doc):
            pods.append((f"{doc['kind']} {doc['metadata']['name']} {label}", spec))
    manifest = _render_work_pool(work_pool_template, {"name": "train-ssd"})["job_manifest"]
    pods += [(f"work pool {label}", spec) for label, spec in pod_specs(manifest)]
    return pods


def test_every_container_is_non_root_and_unprivileged(k8s_documents, work_pool_template):
    pods = _all_pods(k8s_documents, work_pool_template)
    assert len(pods) >= 7
    for label, pod in pods:
        pod_context = pod.get("securityContext", {})
        for container in pod["containers"]:
            context = {**pod_context, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, label
            assert context.get("runAsUser", 1000) != 0, label
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, label
            assert not container.get("securityContext", {}).get("privileged"), label
        assert not pod.get("hostNetwork"), label


def test_images_are_the_project_image_pinned_to_the_project_version(k8s_documents, work_pool_template):
    assert f'version = "{PROJECT_VERSION}"' in (REPO / "pyproject.toml").read_text()
    for label, pod in _all_pods(k8s_documents, work_pool_template):
        for container in pod["containers"]:
            repository, _, tag = container["image"].rpartition(":")
            assert repository.endswith("/ssd-pipeline"), label
            assert tag in (f"{PROJECT_VERSION}-cpu", f"{PROJECT_VERSION}-gpu"), label
    for doc in _by_kind(k8s_documents, "RayCluster"):
        for group in doc["spec"]["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            wants_gpu = "nvidia.com/gpu" in container["resources"]["limits"]
            assert container["image"].endswith("-gpu") == wants_gpu, group["groupName"]


def test_ray_version_matches_the_lock(k8s_documents):
    ray_version = lock_versions()["ray"]
    for doc in _by_kind(k8s_documents, "RayCluster"):
        assert doc["spec"]["rayVersion"] == ray_version
    for doc in _by_kind(k8s_documents, "RayJob"):
        assert doc["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_nothing_is_exposed_beyond_the_cluster(k8s_documents):
    for doc in k8s_documents:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    heads = [doc["spec"]["headGroupSpec"] for doc in _by_kind(k8s_documents, "RayCluster")]
    heads += [doc["spec"]["rayClusterSpec"]["headGroupSpec"] for doc in _by_kind(k8s_documents, "RayJob")]
    assert heads and all(head["serviceType"] == "ClusterIP" for head in heads)
    for path in list((INFRA / "k8s").glob("*.yaml")) + list((INFRA / "prefect").glob("*.yaml")):
        text = path.read_text()
        assert "LoadBalancer" not in text and "NodePort" not in text, path
    server = yaml.safe_load((INFRA / "prefect" / "server-values.yaml").read_text())
    assert server["service"]["type"] == "ClusterIP" and server["ingress"]["enabled"] is False


def test_code_containers_get_every_config_variable_the_code_reads(k8s_documents, work_pool_template):
    (config_map,) = [doc for doc in _by_kind(k8s_documents, "ConfigMap") if doc["metadata"]["name"] == "ssd-env"]
    needed = code_config_env_names() | {"AWS_ENDPOINT_URL", "PREFECT_API_URL"}
    for label, pod in _all_pods(k8s_documents, work_pool_template):
        if "submitter" in label:  # runs `ray job submit` only
            continue
        (container,) = pod["containers"]
        sources = container["envFrom"]
        assert {"configMapRef": {"name": "ssd-env"}} in sources, label
        assert {"secretRef": {"name": "ssd-s3", "optional": True}} in sources, label
        assert pod["serviceAccountName"] == "ssd-runner", label
        env = container.get("env") or {}
        env_names = set(env) if isinstance(env, dict) else {item["name"] for item in env}
        provided = env_names | set(config_map["data"]) | S3_SECRET_KEYS
        if not label.startswith("work pool"):
            provided |= SET_BY_RAY_IN_RAY_PODS
        missing = needed - provided
        assert not missing, f"{label} does not get {sorted(missing)}"


def test_credentials_come_from_irsa_or_a_secret_never_a_manifest(k8s_documents):
    (account,) = _by_kind(k8s_documents, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert not _by_kind(k8s_documents, "Secret"), "secrets are created with kubectl, not kept in the repo"
    (config_map,) = _by_kind(k8s_documents, "ConfigMap")
    assert not set(config_map["data"]) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def _rayjob(k8s_documents, name: str) -> tuple[list[str], dict]:
    (job,) = [doc for doc in _by_kind(k8s_documents, "RayJob") if doc["metadata"]["name"] == name]
    return shlex.split(job["spec"]["entrypoint"]), job


def _train_entrypoint(k8s_documents) -> tuple[list[str], dict]:
    return _rayjob(k8s_documents, "ssd-train")


def test_rayjob_trains_ssd300_on_as_many_gpus_as_it_asks_for(k8s_documents):
    argv, job = _train_entrypoint(k8s_documents)
    assert argv[:2] == ["ssd", "train"]
    options = {
        token: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
        for i, token in enumerate(argv)
        if token.startswith("--")
    }
    assert "--gpu" in argv
    assert options["--arch"] == "ssd300_vgg16"
    assert options["--data"].startswith("s3://") and options["--output"].startswith("s3://")
    gpus = 0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        gpus += int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) * group["replicas"]
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    assert int(options["--workers"]) == gpus
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_entrypoint_is_accepted_by_the_ssd_command(k8s_documents):
    """The RayJob's `ssd train` command line parses with the real CLI."""
    argv, _ = _train_entrypoint(k8s_documents)
    from ssd_core.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert args.gpu is True and args.workers == int(argv[argv.index("--workers") + 1])


def _group_resources(job: dict) -> dict[str, tuple[int, float, int]]:
    """groupName -> (GPUs per pod, CPUs per pod, maxReplicas) of a RayJob's worker groups."""
    groups = {}
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        groups[group["groupName"]] = (int(limits.get("nvidia.com/gpu", 0)), float(limits["cpu"]), group["maxReplicas"])
    return groups


def test_rayjob_detect_runs_its_actors_on_the_gpu_workers_not_the_cpu_head(k8s_documents):
    """The driver runs on a head without CPUs for work or GPUs; the entrypoint asks for GPU actors and
    lets the pool grow to exactly the GPUs the worker groups can hold, as the real CLI parses it."""
    from ssd_core.bulk.pipeline import plan_actors
    from ssd_core.cli import build_parser
    from ssd_core.cluster import NodeResources

    argv, job = _rayjob(k8s_documents, "ssd-detect")
    assert argv[:2] == ["ssd", "detect"]
    args = build_parser().parse_args(argv[1:])
    assert args.input.startswith("s3://") and args.output.startswith("s3://") and args.weights.startswith("s3://")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _group_resources(job)
    gpus = sum(per_pod * replicas for per_pod, _, replicas in groups.values())
    assert args.num_gpus_per_actor > 0 and args.max_actors * args.num_gpus_per_actor == gpus
    # The actor plan for the full cluster, and for the moment the job starts with no GPU pod up yet.
    nodes = [NodeResources("head", 0, 0)] + [
        NodeResources(f"{name}-{i}", cpus, per_pod) for name, (per_pod, cpus, replicas) in groups.items()
        for i in range(replicas)
    ]
    kwargs = dict(batch_size=args.batch_size, rows_per_file=args.rows_per_file,
                  num_gpus_per_actor=args.num_gpus_per_actor, max_actors=args.max_actors)
    full = plan_actors(nodes, 10**6, **kwargs)
    assert (full.use_gpu, full.max_actors) == (True, gpus)
    starting = plan_actors(nodes[:1], 10**6, **kwargs)
    assert (starting.use_gpu, starting.min_actors, starting.max_actors) == (True, 1, gpus)
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_work_pool_template_passes_prefects_validation(work_pool_template):
    validate_base_job_template(work_pool_template)
    schema = work_pool_template["variables"]
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = BaseJobConfiguration._get_base_config_defaults(schema["properties"])
    jsonschema.validate(defaults, schema)
    broken = deepcopy(work_pool_template)
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = "{{ undeclared }}"
    with pytest.raises(ValueError, match="undeclared"):
        validate_base_job_template(broken)


def test_work_pool_renders_a_job_with_deployment_overrides(work_pool_template):
    image = "registry.example/ssd-pipeline:0.1.0-gpu"
    config = _render_work_pool(work_pool_template, {"name": "detect-bucket", "image": image, "cpu": "8"})
    manifest = config["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "ssd"
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image
    assert container["resources"]["limits"]["cpu"] == "8"
    ray_address = urlparse(config["env"]["RAY_ADDRESS"])
    assert ray_address.scheme == "ray"
    assert manifest["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_work_pool_ray_address_reaches_the_raycluster_client_port(k8s_documents, work_pool_template):
    config = _render_work_pool(work_pool_template, {"name": "x"})
    address = urlparse(config["env"]["RAY_ADDRESS"])
    (cluster,) = _by_kind(k8s_documents, "RayCluster")
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert address.hostname == f"{name}-head-svc.{namespace}.svc.cluster.local"  # KubeRay's head service
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"containerPort": address.port, "name": "client"} in head["ports"]


def test_prefect_addresses_and_versions_agree(k8s_documents):
    (config_map,) = _by_kind(k8s_documents, "ConfigMap")
    worker = yaml.safe_load((INFRA / "prefect" / "worker-values.yaml").read_text())["worker"]
    server = yaml.safe_load((INFRA / "prefect" / "server-values.yaml").read_text())["server"]
    assert config_map["data"]["PREFECT_API_URL"] == worker["selfHostedServerApiConfig"]["apiUrl"]
    assert urlparse(worker["selfHostedServerApiConfig"]["apiUrl"]).hostname.startswith("prefect-server.prefect.")
    assert worker["config"]["workPool"] == "ssd-k8s" and worker["config"]["type"] == "kubernetes"
    prefect_version = lock_versions()["prefect"]
    assert worker["image"]["prefectTag"].startswith(f"{prefect_version}-python3.11")
    assert server["image"]["prefectTag"].startswith(f"{prefect_version}-python3.11")
    for values in (worker, server):
        assert values["podSecurityContext"]["runAsNonRoot"] is True
        assert values["containerSecurityContext"]["allowPrivilegeEscalation"] is False
