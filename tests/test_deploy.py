"""Deployment manifests: cluster.yaml (Ray cluster launcher) and deploy/kuberay/*.yaml (KubeRay).

No Ray is started and nothing is downloaded. cluster.yaml goes through the launcher's own checks
(``prepare_config`` + ``validate_config``, the first steps of ``ray up``) and Ray's JSON schema; the
KubeRay manifests through a trimmed copy of the KubeRay CRD schemas (below) and through what they
run: the ``jobs.<x>`` module is executed as ``python -m`` would (with ``--help``) and the config
file is loaded with ``load_config``.
"""

from __future__ import annotations

import copy
import io
import json
import re
import runpy
import shlex
import sys
from contextlib import redirect_stdout
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY = ROOT / "deploy" / "kuberay"
RAYJOB = KUBERAY / "rayjob-nightly.yaml"
RAYCRONJOB = KUBERAY / "raycronjob-nightly.yaml"
DOCKERFILE = KUBERAY / "Dockerfile"
NETWORK_POLICY = KUBERAY / "networkpolicy.yaml"
MANIFESTS = {RAYJOB.name: ("RayJob", RAYJOB), RAYCRONJOB.name: ("RayCronJob", RAYCRONJOB)}
# `batchrank <command>` names of the jobs, and the modules that `python -m` runs for them
JOB_COMMANDS = {"index", "rerank", "nightly", "eval", "train-reranker", "train-biencoder"}
ENTRYPOINT = re.compile(r"python -m (jobs\.[a-z_]+) --config (\S+)")


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a YAML mapping"
    return data


def _pin(text: str, package: str) -> str:
    """The version `package==X` pins in a requirements-style text (first match)."""
    found = re.search(rf"(?m)^\s*{re.escape(package)}(?:\[[^\]]*\])?==([\w.+-]+)", text) or \
        re.search(rf"{re.escape(package)}==([\w.+]+)", text)
    assert found, f"no {package}==... pin"
    return found.group(1)


LOCK = (ROOT / "requirements-lock.txt").read_text(encoding="utf-8")
RAY_PIN = _pin(LOCK, "ray")
TORCH_PIN = _pin((ROOT / "Makefile").read_text(encoding="utf-8"), "torch")


def _run_module_help(module: str) -> str:
    """Run `python -m <module> --help` in this process, the way `-m` runs it; return its output."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None), f"python -m {module} --help exited {exit_info.value.code}"
    return out.getvalue()


def _check_job_command(module: str, config: Path) -> None:
    """`python -m <module> --config <config>` names a runnable job module and a config that loads."""
    from pipelines.config import load_config

    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"{module}: no {source.relative_to(ROOT)}"
    assert 'if __name__ == "__main__":' in source.read_text(encoding="utf-8"), f"{module}: no __main__ guard"
    usage = _run_module_help(module)
    assert f"python -m {module}" in usage and "--config" in usage, usage
    assert config.is_file(), f"config {config} does not exist"
    load_config(config)


# --------------------------------------------------------------------------------------------------
# cluster.yaml: the Ray cluster launcher
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> dict:
    return _load(CLUSTER_YAML)


@pytest.fixture(scope="module")
def prepared(cluster) -> dict:
    """cluster.yaml as `ray up` sees it before it talks to AWS: defaults filled, setup commands merged."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(cluster))


def test_cluster_yaml_passes_the_launchers_validation(prepared):
    """`ray up` runs prepare_config then validate_config (ray-schema.json and the cross-field checks)."""
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)


def test_cluster_yaml_matches_the_launchers_json_schema(cluster):
    """The file as written (not only after Ray's defaults) against the schema shipped with Ray."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert cluster["provider"]["type"] == "aws"


def test_cluster_head_runs_no_tasks(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0: drivers only, no tasks or actors"
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0


def test_cluster_gpu_workers_autoscale(cluster):
    workers = {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu, "no worker node type offers a GPU"
    for name, node_type in gpu.items():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"], f"{name} does not autoscale"
        assert node_type["max_workers"] <= cluster["max_workers"], f"{name}: max_workers above the global max_workers"
    assert cluster["idle_timeout_minutes"] > 0


def test_cluster_dashboard_is_not_exposed(cluster, prepared):
    head_start = " ".join(cluster["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert hosts == ["127.0.0.1"], f"dashboard host {hosts}: it must listen on the head's loopback only"
    assert "0.0.0.0" not in head_start + " ".join(cluster["worker_start_ray_commands"])
    # the security group Ray creates opens SSH and intra-cluster traffic; nothing may be added to it
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    for rule in rules:
        assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), f"inbound rule beyond SSH: {rule}"
    for name, node_type in prepared["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], f"{name} bypasses the cluster's security group"


def test_cluster_setup_installs_batchrank_on_every_node(cluster, prepared):
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local in (".", "./"))
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[role]  # setup_commands + the role's own, as the launcher runs them
        torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
        install_at = next(i for i, c in enumerate(commands) if re.search(rf"pip install .*-e {re.escape(mount)}\b", c))
        assert torch_at < install_at, f"{role}: torch must be pinned before batchrank pulls an unpinned one"
        pins = set(re.findall(r"torch==([\w.+]+)", commands[torch_at]))
        assert pins == {TORCH_PIN}, f"{role}: torch {pins}, the Makefile pins {TORCH_PIN}"
    # every file of the checkout that a command reads exists (the checkout is mounted at `mount`)
    for command in cluster["setup_commands"]:
        for rel in re.findall(rf"{re.escape(mount)}/([\w./-]+)", command):
            assert (ROOT / rel).exists(), f"setup command reads {mount}/{rel}, which is not in the repository"
    assert any("requirements-lock.txt" in c for c in cluster["setup_commands"])
    assert any("boto3" in c for c in prepared["head_setup_commands"]), "the autoscaler on the head needs boto3"


def test_cluster_runs_the_pinned_ray_and_python(cluster):
    import ray

    assert ray.__version__ == RAY_PIN, "requirements-lock.txt pins another Ray than the one installed"
    docker = cluster["docker"]
    images = [docker["image"], docker.get("head_image", docker["image"]), docker.get("worker_image", docker["image"])]
    for image in images:
        tag = re.fullmatch(r"rayproject/ray:([\d.]+)-py3(\d+)(-[\w]+)?", image)
        assert tag, f"unexpected image {image}"
        assert tag.group(1) == RAY_PIN, f"{image}: not the Ray of requirements-lock.txt ({RAY_PIN})"
        assert int(tag.group(2)) >= 11, f"{image}: batchrank needs Python >= 3.11"
    assert docker.get("worker_image", docker["image"]).endswith("-gpu")


def test_cluster_job_examples_name_real_jobs_and_configs():
    """The submit commands in cluster.yaml's comments run real modules with real configs."""
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    runs = ENTRYPOINT.findall(comments)
    assert any(module == "jobs.nightly" for module, _ in runs)
    for module, config in runs:
        _check_job_command(module, ROOT / config)
    submits = re.findall(r"batchrank submit (\S+) .*--config (\S+)", comments)
    assert submits, "no `batchrank submit` example"
    for job, config in submits:
        assert job in JOB_COMMANDS, f"batchrank submit {job}: not a job"
        assert (ROOT / config).is_file(), config


def test_cluster_batchrank_submit_example_prepares():
    """`batchrank submit nightly ... --config configs/cluster-s3.yaml` builds its submission (nothing is sent)."""
    submit = pytest.importorskip("pipelines.cluster.submit")
    sub = submit.prepare("nightly", ROOT / "configs" / "cluster-s3.yaml", address="http://127.0.0.1:8265", pip=False)
    assert ENTRYPOINT.match(sub.entrypoint) and "pip" not in sub.runtime_env


def test_cluster_config_fits_the_cluster(cluster):
    from pipelines.config import load_config

    cfg = load_config(ROOT / "configs" / "cluster-s3.yaml")
    assert "://" in cfg.storage.uri, "a cluster's tables must be on an object store, shared by every node"
    gpus = sum(t.get("resources", {}).get("GPU", 0) * t["max_workers"]
               for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"])
    for stage in (cfg.embed, cfg.rerank):
        assert stage.gpus_per_actor >= 1
        assert stage.actors * stage.gpus_per_actor <= gpus, "more GPUs asked for than the cluster can have"


# --------------------------------------------------------------------------------------------------
# deploy/kuberay: RayJob and RayCronJob
# --------------------------------------------------------------------------------------------------
# A trimmed copy of the KubeRay CRD schemas (ray-project/kuberay,
# ray-operator/config/crd/bases/ray.io_rayjobs.yaml and ray.io_raycronjobs.yaml, KubeRay 1.6 era):
# the fields these manifests use, with their types and enums. The objects marked `closed` list only
# field names checked in the CRD; the API server would prune an unknown (misspelt) field there
# silently, so a closed object turns that into a test failure. Extend a list when a manifest starts
# using a newer field.
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY = {"anyOf": [{"type": "integer", "minimum": 0},
                       {"type": "string",
                        "pattern": rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"}]}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_RESOURCES = {"type": "object", "additionalProperties": False,
              "properties": {"limits": {"type": "object", "additionalProperties": _QUANTITY},
                             "requests": {"type": "object", "additionalProperties": _QUANTITY},
                             "claims": {"type": "array"}}}
_CONTAINER = {"type": "object", "required": ["name"],
              "properties": {"name": {"type": "string"}, "image": {"type": "string"}, "resources": _RESOURCES,
                             "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                                                  "properties": {"containerPort": {"type": "integer"},
                                                                                 "name": {"type": "string"}}}},
                             "volumeMounts": {"type": "array", "items": {"type": "object",
                                                                         "required": ["mountPath", "name"]}}}}
_POD_TEMPLATE = {"type": "object",
                 "properties": {"metadata": {"type": "object"},
                                "spec": {"type": "object", "required": ["containers"],
                                         "properties": {"containers": {"type": "array", "minItems": 1,
                                                                       "items": _CONTAINER},
                                                        "volumes": {"type": "array",
                                                                    "items": {"type": "object", "required": ["name"]}},
                                                        "tolerations": {"type": "array"},
                                                        "serviceAccountName": {"type": "string"}}}}}
_HEAD_GROUP = {"type": "object", "required": ["template"], "additionalProperties": False,  # closed
               "properties": {"enableIngress": {"type": "boolean"}, "headService": {"type": "object"},
                              "labels": _STRINGS, "rayStartParams": _STRINGS, "resources": _STRINGS,
                              "serviceType": {"type": "string"}, "template": _POD_TEMPLATE}}
_WORKER_GROUP = {"type": "object", "required": ["groupName", "template"], "additionalProperties": False,  # closed
                 "properties": {"groupName": {"type": "string"}, "idleTimeoutSeconds": {"type": "integer"},
                                "labels": _STRINGS, "maxReplicas": {"type": "integer", "minimum": 0},
                                "minReplicas": {"type": "integer", "minimum": 0}, "numOfHosts": {"type": "integer"},
                                "rayStartParams": _STRINGS, "replicas": {"type": "integer", "minimum": 0},
                                "resources": _STRINGS, "scaleStrategy": {"type": "object"},
                                "suspend": {"type": "boolean"}, "template": _POD_TEMPLATE}}
_RAY_CLUSTER_SPEC = {
    "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,  # closed
    "properties": {
        "authOptions": {"type": "object", "additionalProperties": False,  # closed (KubeRay 1.6.2's AuthOptions)
                        "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
                                       "enableK8sTokenAuth": {"type": "boolean"}}},
        "autoscalerOptions": {"type": "object", "properties": {
            "idleTimeoutSeconds": {"type": "integer"},
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "version": {"enum": ["v1", "v2"]}, "resources": _RESOURCES}},
        "enableInTreeAutoscaling": {"type": "boolean"}, "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": _HEAD_GROUP, "headServiceAnnotations": _STRINGS, "managedBy": {"type": "string"},
        "rayVersion": {"type": "string"}, "suspend": {"type": "boolean"},
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP}}}
_RAY_JOB_SPEC = {
    "type": "object", "additionalProperties": False,  # closed
    "required": ["entrypoint", "rayClusterSpec"],     # not required by the CRD, but by these manifests
    "properties": {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": {"type": "integer", "minimum": 0},
        "clusterSelector": _STRINGS, "deletionStrategy": {"type": "object"}, "entrypoint": {"type": "string"},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"}, "jobId": {"type": "string"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}, "metadata": _STRINGS,
        "rayClusterSpec": _RAY_CLUSTER_SPEC, "runtimeEnvYAML": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterConfig": {"type": "object"}, "submitterPodTemplate": {"type": "object"},
        "suspend": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0}}}
_RAY_CRON_JOB_SPEC = {"type": "object", "required": ["jobTemplate", "schedule"], "additionalProperties": False,
                      "properties": {"jobTemplate": _RAY_JOB_SPEC, "schedule": {"type": "string"},
                                     "suspend": {"type": "boolean"}}}


def _object_schema(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                           "metadata": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string"}, "labels": _STRINGS}},
                           "spec": spec}}


SCHEMAS = {"RayJob": _object_schema("RayJob", _RAY_JOB_SPEC),
           "RayCronJob": _object_schema("RayCronJob", _RAY_CRON_JOB_SPEC)}
# RayJob names get 6 characters appended for their RayCluster (at most 53): KubeRay refuses longer ones
MAX_RAYJOB_NAME = 47


def _job_spec(manifest: dict) -> dict:
    return manifest["spec"]["jobTemplate"] if manifest["kind"] == "RayCronJob" else manifest["spec"]


def _image_app_dir() -> str:
    workdirs = re.findall(r"(?m)^WORKDIR\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1].rstrip("/")


@pytest.fixture(scope="module", params=sorted(MANIFESTS))
def manifest(request) -> dict:
    kind, path = MANIFESTS[request.param]
    data = _load(path)
    assert (data.get("apiVersion"), data.get("kind")) == ("ray.io/v1", kind), f"{path.name}"
    return data


def test_kuberay_manifest_matches_the_crd_schema(manifest):
    validator = jsonschema.Draft7Validator(SCHEMAS[manifest["kind"]])
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    name = manifest["metadata"]["name"]
    longest = name if manifest["kind"] == "RayJob" else name + "-xxxxx"  # RayCronJob's RayJobs: <name>-<5 chars>
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(longest) <= MAX_RAYJOB_NAME, name


def test_kuberay_entrypoint_runs_a_real_job_with_a_real_config(manifest):
    entrypoint = _job_spec(manifest)["entrypoint"].strip()
    # KubeRay pastes the entrypoint into the submitter's shell line: one plain command, no operators
    assert not re.search(r"[;&|<>`$()]", entrypoint), f"shell syntax in the entrypoint: {entrypoint!r}"
    match = ENTRYPOINT.fullmatch(" ".join(shlex.split(entrypoint)))
    assert match, f"entrypoint is not `python -m jobs.<job> --config FILE`: {entrypoint!r}"
    module, config = match.groups()
    # an absolute path is one inside the image: the Dockerfile's WORKDIR holds this checkout
    app = _image_app_dir()
    if config.startswith("/"):
        assert config.startswith(app + "/"), f"{config} is outside the image's copy of the repository ({app})"
        config = config[len(app) + 1:]
    _check_job_command(module, ROOT / config)
    copied = re.findall(r"(?m)^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", DOCKERFILE.read_text(encoding="utf-8"))
    sources = {src.rstrip("/") for line in copied for src in line.split()}
    for needed in (config.split("/")[0], module.split(".")[0], "pipelines", "requirements-lock.txt", "pyproject.toml"):
        assert needed in sources, f"the Dockerfile does not copy {needed} into the image"
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"


def test_kuberay_cluster_is_a_cpu_head_and_autoscaled_gpu_workers(manifest):
    import ray

    job = _job_spec(manifest)
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["activeDeadlineSeconds"] > 0
    spec = job["rayClusterSpec"]
    assert spec["rayVersion"] == RAY_PIN == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must run drivers only"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    images = {head_container["image"]}
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        if int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
            assert group["minReplicas"] < group["maxReplicas"], f"{group['groupName']} does not autoscale"
    assert gpu_groups, "no GPU worker group"
    assert len(images) == 1, f"head and workers run different images: {images}"

    from pipelines.config import load_config

    config = ENTRYPOINT.search(job["entrypoint"]).group(2)
    cfg = load_config(ROOT / config.removeprefix(_image_app_dir() + "/"))
    max_gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                           ["nvidia.com/gpu"]) for g in gpu_groups)
    for stage in (cfg.embed, cfg.rerank):
        assert stage.actors * stage.gpus_per_actor <= max_gpus, "more GPUs asked for than maxReplicas allow"


def test_kuberay_image_is_built_on_the_pinned_ray_and_torch():
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"(?m)^ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py3(\d+)-gpu$", text)
    assert base and base.group(1) == RAY_PIN and int(base.group(2)) >= 11
    assert set(re.findall(r"torch==([\w.+]+)", text)) == {TORCH_PIN}
    torch_at, install_at = text.index("torch=="), text.index("-r requirements-lock.txt")
    assert torch_at < install_at, "torch must be installed (pinned) before the stack"


def test_raycronjob_runs_the_rayjob_nightly_without_overlap():
    cron, job = _load(RAYCRONJOB), _load(RAYJOB)
    assert cron["spec"]["jobTemplate"] == job["spec"], \
        "raycronjob-nightly.yaml's jobTemplate drifted from rayjob-nightly.yaml's spec"
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5, "a standard 5-field cron schedule"
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    for field, (low, high) in zip(fields, ranges):
        for part in field.split(","):
            assert re.fullmatch(r"(\*|\d+(-\d+)?)(/\d+)?", part), f"bad cron field {field!r}"
            for number in map(int, re.findall(r"\d+", part.split("/")[0])):
                assert low <= number <= high, f"{number} out of range in {field!r}"
    daily = fields[1].isdigit() and fields[2:] == ["*", "*", "*"]
    assert daily, "expected one run a day"
    # RayCronJob has no concurrencyPolicy: a night must end before the next one starts
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


# --------------------------------------------------------------------------------------------------
# deploy/kuberay: who can reach the Ray clusters (token authentication and NetworkPolicy)
# --------------------------------------------------------------------------------------------------

def test_kuberay_clusters_require_a_token(manifest):
    """KubeRay (1.5.1+) generates a token per Ray cluster and gives it to the head, the workers and the
    submitter; Ray (2.52+) then refuses GCS, dashboard and Jobs API calls without it."""
    spec = _job_spec(manifest)["rayClusterSpec"]
    assert spec.get("authOptions", {}).get("mode") == "token", "token authentication is off"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52), "token auth needs Ray 2.52+"
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env, f"{container['name']} overrides auth"
    assert "RAY_AUTH_MODE" not in DOCKERFILE.read_text(encoding="utf-8")
    text = MANIFESTS[f"{'rayjob' if manifest['kind'] == 'RayJob' else 'raycronjob'}-nightly.yaml"][1].read_text(
        encoding="utf-8")
    assert "kubectl apply -f deploy/kuberay/networkpolicy.yaml" in text, "the manifest does not say to apply it"


# A trimmed copy of the networking.k8s.io/v1 NetworkPolicy schema (Kubernetes API reference), closed
# where a misspelt field would silently widen or narrow a policy.
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _STRINGS,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
        "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _LABEL_SELECTOR, "namespaceSelector": _LABEL_SELECTOR,
    "ipBlock": {"type": "object", "required": ["cidr"], "additionalProperties": False,
                "properties": {"cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}}}
_NP_PORT = {"type": "object", "additionalProperties": False, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"type": ["integer", "string"]},
    "endPort": {"type": "integer"}}}
_NP_RULE = {"type": "object", "additionalProperties": False, "properties": {
    "from": {"type": "array", "items": _PEER}, "to": {"type": "array", "items": _PEER},
    "ports": {"type": "array", "items": _NP_PORT}}}
NETWORK_POLICY_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name"], "not": {"required": ["namespace"]},  # kubectl -n decides
                     "properties": {"name": {"type": "string"}, "labels": _STRINGS}},
        "spec": {"type": "object", "required": ["podSelector"], "additionalProperties": False, "properties": {
            "podSelector": _LABEL_SELECTOR, "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": _NP_RULE}, "egress": {"type": "array", "items": _NP_RULE}}}}}


def _policies() -> list[dict]:
    docs = [d for d in yaml.safe_load_all(NETWORK_POLICY.read_text(encoding="utf-8")) if d is not None]
    assert docs, "no NetworkPolicy"
    return docs


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector applied to a label set (an empty selector selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, source: dict) -> bool:
    """``source``: {"labels": {...}, "namespace": {...} (its namespace's labels), "same_namespace": bool} or
    {"external": True} (an address outside the cluster's pods)."""
    if source.get("external"):
        return "ipBlock" in peer
    if "ipBlock" in peer:
        return False  # a pod's own address in an ipBlock: left aside (plugin-dependent); none is used here
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], source["namespace"]):
            return False
    elif not source["same_namespace"]:
        return False
    return _selects(peer.get("podSelector", {}), source["labels"])


def _reachable(target: dict, port: int, source: dict, policies: list[dict]) -> bool:
    """Whether ``source`` may open a TCP connection to ``port`` of a pod with ``target`` labels."""
    selecting = [p["spec"] for p in policies if _selects(p["spec"]["podSelector"], target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True  # not isolated: Kubernetes' default lets everything in
    names = {"dashboard": 8265, "gcs-server": 6379, "client": 10001}
    for spec in selecting:
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            port_ok = not ports or any(
                p.get("protocol", "TCP") == "TCP"
                and (p.get("port") is None or names.get(p["port"], p["port"]) == port
                     or (p.get("endPort") and p["port"] <= port <= p["endPort"])) for p in ports)
            peers = rule.get("from")
            if port_ok and (not peers or any(_peer_matches(peer, source) for peer in peers)):
                return True
    return False


def test_network_policy_matches_the_schema():
    validator = jsonschema.Draft7Validator(NETWORK_POLICY_SCHEMA)
    for policy in _policies():
        errors = sorted(validator.iter_errors(policy), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
        assert policy["spec"].get("policyTypes") == ["Ingress"], "ingress only: egress (S3, DNS) stays open"
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, "no address range is admitted"


def test_network_policy_admits_only_the_cluster_the_operator_and_the_submitter(manifest):
    """The head's GCS, Ray client and dashboard/Jobs API, and the workers, as KubeRay labels the pods of
    this manifest's clusters: reachable by the Ray pods of batchrank; 8265 also by the KubeRay operator and
    the submitter Job; nothing else, from this namespace or another."""
    policies = _policies()
    spec = _job_spec(manifest)["rayClusterSpec"]
    head_template = spec["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head_template["spec"]["containers"][0]["ports"]}
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379

    def pod(template: dict, node_type: str, group: str) -> dict:  # what KubeRay puts on a Ray pod
        return {**template.get("metadata", {}).get("labels", {}), "ray.io/node-type": node_type,
                "ray.io/is-ray-node": "yes", "ray.io/cluster": "batchrank-nightly-x7k2p", "ray.io/group": group}

    head = pod(head_template, "head", "headgroup")
    workers = [pod(g["template"], "worker", g["groupName"]) for g in spec["workerGroupSpecs"]]
    ns = {"kubernetes.io/metadata.name": "batchrank"}
    here = {"namespace": ns, "same_namespace": True}
    sources = {
        "worker": [{"labels": w, **here} for w in workers],
        "head": [{"labels": head, **here}],
        "operator": [{"labels": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/component":
                                 "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"},
                      "namespace": {"kubernetes.io/metadata.name": "kuberay-system"}, "same_namespace": False}],
        "submitter": [{"labels": {"batch.kubernetes.io/job-name": "batchrank-nightly-x7k2p",
                                  "job-name": "batchrank-nightly-x7k2p",
                                  "batch.kubernetes.io/controller-uid": "0f1e"}, **here}],
        "other pod here": [{"labels": {"app": "web"}, **here}, {"labels": {}, **here}],
        "other namespace": [{"labels": {"app": "web"}, "namespace": {"kubernetes.io/metadata.name": "web"},
                             "same_namespace": False},
                            {"labels": head, "namespace": {"kubernetes.io/metadata.name": "web"},
                             "same_namespace": False}],
        "outside": [{"external": True}],
    }
    expected = {  # (target, port) -> the sources that may connect
        ("head", 8265): {"worker", "head", "operator", "submitter"},
        ("head", 6379): {"worker", "head"},
        ("head", 10001): {"worker", "head"},
        ("worker", 10002): {"worker", "head"},  # a worker process's port (Ray picks them at random)
    }
    for (target_name, port), allowed in expected.items():
        targets = [head] if target_name == "head" else workers
        for target in targets:
            for source_name, group in sources.items():
                for source in group:
                    got = _reachable(target, port, source, policies)
                    assert got == (source_name in allowed), \
                        f"{source_name} -> {target_name}:{port}: {'admitted' if got else 'refused'}"
