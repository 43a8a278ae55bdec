"""Offline checks of what users deploy: KubeRay manifests, the AWS cluster-launcher
YAML and the Dockerfile.

* Every ray.io document under cluster/kuberay/ is validated against the KubeRay
  CRD of its kind and version (cluster/kuberay/crds/, vendored with their source and
  version in SOURCE.md, so the test runs from a bare clone), in strict mode: an unknown field is an error, as with `kubectl apply
  --validate=strict`, instead of being pruned silently by the API server.
* cluster/aws/*.yaml is validated against Ray's own ray-schema.json and, merged
  with Ray's AWS defaults, by Ray's validate_config.
* Deployment policies (head takes no work and stays on on-demand nodes, GPU workers
  on spot and scale from zero, no secrets inline, non-root containers, grace period
  longer than Ray's drain) are checked by functions that return a list of problems;
  negative tests feed them broken copies, so no check passes vacuously.
* Security, statically: a NetworkPolicy isolates each KubeRay deployment and lists every
  port it admits; images are pinned by tag or digest (``name:tag@sha256:...``); the
  image's dependencies come from a hashed lock file; the AWS launcher uses its own
  least-privilege instance profiles (cluster/aws/iam.cfn.json), IMDSv2 and a security
  group with SSH from one CIDR. These say what the files declare, not that a cluster
  enforces it (a NetworkPolicy needs a CNI that implements it).

Run: python -m pytest -q tests/unit/test_cluster_manifests.py
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERAY_SCHEMA_DIR = REPO_ROOT / "cluster" / "kuberay" / "crds"
KUBERAY_DIR = REPO_ROOT / "cluster" / "kuberay"
AWS_DIR = REPO_ROOT / "cluster" / "aws"
DOCKERFILE = REPO_ROOT / "Dockerfile"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML


def _yaml_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


KUBERAY_FILES = _yaml_files(KUBERAY_DIR)
AWS_FILES = _yaml_files(AWS_DIR)


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(REPO_ROOT).as_posix() for p in paths]


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def _ray_documents(path: Path) -> list[dict]:
    return [d for d in _documents(path) if str(d.get("apiVersion", "")).startswith("ray.io/")]


# --------------------------------------------------------------------------------------
# KubeRay CRD schemas
# --------------------------------------------------------------------------------------


def _strict(schema: dict) -> dict:
    """The CRD schema as Kubernetes enforces it with strict field validation.

    A CRD's structural schema omits `additionalProperties`; the API server prunes
    unknown fields (or rejects them with --validate=strict), while plain JSON Schema
    would accept them. Close every object that lists its properties, unless it asks
    to keep unknown fields. OpenAPI's `nullable` becomes a JSON Schema null type.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): strict openAPIV3Schema} for every vendored CRD."""
    crd_files = sorted(KUBERAY_SCHEMA_DIR.glob("*.yaml")) if KUBERAY_SCHEMA_DIR.is_dir() else []
    if not crd_files:
        pytest.fail(
            f"KubeRay CRD schemas not found in {KUBERAY_SCHEMA_DIR}. They are vendored test data "
            "(ray.io_rayclusters.yaml, ray.io_rayjobs.yaml from ray-project/kuberay "
            "ray-operator/config/crd/bases/, see SOURCE.md there); restore them from git. "
            "The manifests cannot be validated without them.",
            pytrace=False,
        )
    schemas = {}
    for crd_file in crd_files:
        crd = yaml.load(crd_file.read_text(), Loader=_Loader)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = _strict(
                version["schema"]["openAPIV3Schema"]
            )
    return schemas


def _crd_errors(doc: dict) -> list[str]:
    """Schema violations of one ray.io document, as 'path: message' lines."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    schemas = _crd_schemas()
    if key not in schemas:
        return [f"no CRD schema for apiVersion={key[0]} kind={key[1]}; known: {sorted(schemas)}"]
    # OpenAPI 3.0 schemas follow JSON Schema draft 4/5 (e.g. boolean exclusiveMinimum).
    validator = jsonschema.Draft4Validator(schemas[key])
    return [
        f"{_path(e.absolute_path)}: {e.message[:300]}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<document>"


# --------------------------------------------------------------------------------------
# KubeRay policies
# --------------------------------------------------------------------------------------

ON_DEMAND_VALUES = {"on-demand", "ON_DEMAND"}
SPOT_VALUES = {"spot", "SPOT"}
CAPACITY_KEYS = {"karpenter.sh/capacity-type", "eks.amazonaws.com/capacityType"}
RAY_DEFAULT_DRAIN_TIMEOUT_S = 30.0  # ray 2.60: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
SECRET_ENV_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
AWS_ACCESS_KEY_ID_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _cluster_spec(doc: dict) -> dict | None:
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    if doc["kind"] == "RayJob":
        return doc["spec"].get("rayClusterSpec")
    return None


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template in a RayCluster or RayJob."""
    pods = []
    spec = _cluster_spec(doc)
    if spec:
        pods.append(("headGroupSpec", spec["headGroupSpec"]["template"]["spec"]))
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            pods.append((f"workerGroupSpecs[{i}]", group["template"]["spec"]))
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        pods.append(("submitterPodTemplate", doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def _containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, container, its pod spec), autoscaler sidecar included."""
    out = []
    for where, pod in _pod_specs(doc):
        for field in ("initContainers", "containers"):
            for c in pod.get(field, []):
                out.append((f"{where}.{field}[{c.get('name')}]", c, pod))
    spec = _cluster_spec(doc)
    if spec and spec.get("enableInTreeAutoscaling"):
        # KubeRay builds the autoscaler container in the head pod from autoscalerOptions.
        head_pod = spec["headGroupSpec"]["template"]["spec"]
        out.append(("autoscalerOptions", spec.get("autoscalerOptions", {}), head_pod))
    return out


def _capacity_values(pod: dict) -> list[set[str]] | None:
    """Capacity-type values each pod may land on: one set per alternative
    (nodeSelector, or each ORed required nodeAffinity term); None if unconstrained."""
    alternatives = []
    selector = pod.get("nodeSelector", {})
    from_selector = {v for k, v in selector.items() if k in CAPACITY_KEYS}
    terms = (
        pod.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for term in terms:
        values = set()
        for expr in term.get("matchExpressions", []):
            if expr.get("key") in CAPACITY_KEYS and expr.get("operator") == "In":
                values |= set(expr.get("values", []))
        alternatives.append(values | from_selector)
    if not terms and from_selector:
        alternatives.append(from_selector)
    if not alternatives or any(not a for a in alternatives):
        return None  # some way to schedule without a capacity-type constraint
    return alternatives


def _drain_timeout_s(pod: dict) -> float:
    timeouts = [
        float(e["value"])
        for c in pod.get("containers", [])
        for e in c.get("env", [])
        if e.get("name") == "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S" and "value" in e
    ]
    return max(timeouts, default=RAY_DEFAULT_DRAIN_TIMEOUT_S)


def cluster_policy_problems(doc: dict) -> list[str]:
    """Placement, autoscaling and shutdown rules for a RayCluster / RayJob document."""
    problems = []
    spec = _cluster_spec(doc)
    if spec is None:
        return problems
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('headGroupSpec.rayStartParams["num-cpus"] must be "0": no work on the head')
    head_pod = head["template"]["spec"]
    head_capacity = _capacity_values(head_pod)
    if head_capacity is None or any(not a <= ON_DEMAND_VALUES for a in head_capacity):
        problems.append(f"head must be pinned to on-demand nodes, got {head_capacity}")
    for name, service_type in (
        ("headGroupSpec.serviceType", head.get("serviceType")),
        ("headGroupSpec.headService.spec.type", head.get("headService", {}).get("spec", {}).get("type")),
    ):
        if service_type in ("LoadBalancer", "NodePort"):
            problems.append(f"{name} is {service_type}: the dashboard/job API must stay ClusterIP")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress must be false: no ingress to the dashboard")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    groups = spec.get("workerGroupSpecs", [])
    if not groups:
        problems.append("no workerGroupSpecs")
    for i, group in enumerate(groups):
        where = f"workerGroupSpecs[{i}]"
        if group.get("minReplicas") != 0:
            problems.append(
                f"{where}.minReplicas must be 0 (scale from zero), got {group.get('minReplicas')!r}"
            )
        if not isinstance(group.get("maxReplicas"), int) or group["maxReplicas"] < 1:
            problems.append(f"{where}.maxReplicas must be >= 1")
        pod = group["template"]["spec"]
        capacity = _capacity_values(pod)
        if capacity is None or any(not a <= SPOT_VALUES for a in capacity):
            problems.append(f"{where} must select spot nodes, got {capacity}")
        tolerated = {t.get("key") for t in pod.get("tolerations", []) if t.get("value") in SPOT_VALUES}
        if not tolerated & CAPACITY_KEYS:
            problems.append(f"{where} must tolerate the spot taint")
        gpus = [
            c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            for c in pod.get("containers", [])
        ]
        if not any(gpus):
            problems.append(f"{where} requests no nvidia.com/gpu")
    for where, pod in _pod_specs(doc):
        if where == "submitterPodTemplate":
            continue
        grace = pod.get("terminationGracePeriodSeconds", 30)
        drain = _drain_timeout_s(pod)
        if not grace > 60:
            problems.append(f"{where}.terminationGracePeriodSeconds must be > 60, got {grace}")
        if not grace > drain:
            problems.append(
                f"{where}: terminationGracePeriodSeconds ({grace}) must exceed Ray's drain "
                f"timeout ({drain}) or SIGKILL cuts the drain short"
            )
    return problems


def container_problems(doc: dict) -> list[str]:
    """Every container runs as a non-root user without privilege escalation."""
    problems = []
    for where, container, pod in _containers(doc):
        effective = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        if effective.get("runAsNonRoot") is not True:
            problems.append(f"{where}: securityContext.runAsNonRoot must be true")
        if effective.get("runAsUser", 1000) == 0:
            problems.append(f"{where}: runAsUser 0 is root")
        if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
    return problems


def secret_problems(doc) -> list[str]:
    """No credentials inline: secret-looking env vars come from valueFrom/envFrom,
    no Secret objects with data, no AWS key ids anywhere."""
    problems = []
    if isinstance(doc, dict) and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append("a Secret with data is committed; create it with kubectl instead")

    def walk(node, where):
        if isinstance(node, dict):
            name = node.get("name")
            if isinstance(name, str) and "value" in node and SECRET_ENV_NAME.search(name):
                problems.append(f"{where}: {name} has a literal value; use valueFrom.secretKeyRef")
            for k, v in node.items():
                if isinstance(k, str) and k.lower() in ("aws_secret_access_key", "aws_access_key_id"):
                    problems.append(f"{where}.{k}: AWS key inline")
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str) and AWS_ACCESS_KEY_ID_VALUE.search(node):
            problems.append(f"{where}: looks like an AWS access key id")

    walk(doc, doc.get("kind", "doc") if isinstance(doc, dict) else "doc")
    return problems


OMNI_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance")
RAY_INTERNAL = {"protocol": "TCP", "port": 1024, "endPort": 65535}


def _pod_labels(doc: dict) -> list[tuple[str, dict]]:
    """(where, labels) of every pod template in a RayCluster / RayJob."""
    out = []
    spec = _cluster_spec(doc)
    if spec:
        out.append(("headGroupSpec", spec["headGroupSpec"]["template"].get("metadata", {}).get("labels", {})))
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            out.append((f"workerGroupSpecs[{i}]", group["template"].get("metadata", {}).get("labels", {})))
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out.append(("submitterPodTemplate", doc["spec"]["submitterPodTemplate"].get("metadata", {}).get("labels", {})))
    return out


def _rule_problems(where: str, rules: list, peer_key: str) -> list[str]:
    problems = []
    for i, rule in enumerate(rules):
        if not rule.get("ports"):
            problems.append(f"{where}[{i}] admits every port; list the ports it needs")
        if not rule.get(peer_key):
            problems.append(f"{where}[{i}] admits every peer; name them ({peer_key})")
        for peer in rule.get(peer_key, []):
            block = peer.get("ipBlock")
            if block and peer_key == "from":
                problems.append(f"{where}[{i}] admits addresses ({block.get('cidr')}); only pods may connect")
            if block and block.get("cidr") == "0.0.0.0/0":
                ports = {p.get("port") for p in rule.get("ports", [])}
                if ports != {443} or "169.254.169.254/32" not in block.get("except", []):
                    problems.append(f"{where}[{i}]: egress to 0.0.0.0/0 only on 443 and never to 169.254.169.254")
    return problems


def network_policy_problems(docs: list[dict]) -> list[str]:
    """Every Ray pod of a file is selected by a NetworkPolicy of that file that isolates it
    both ways and lists each admitted port: its own pods on Ray's ports, the KubeRay
    operator on the dashboard (8265), DNS and HTTPS out; nothing open to other pods."""
    ray_docs = [d for d in docs if str(d.get("apiVersion", "")).startswith("ray.io/")]
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    if ray_docs and not policies:
        return ["no NetworkPolicy: every pod in the Kubernetes cluster could reach GCS and the job API"]
    problems = []
    for doc in ray_docs:
        for where, labels in _pod_labels(doc):
            if not all(labels.get(k) for k in OMNI_LABELS):
                problems.append(f"{doc['kind']}.{where}: pod labels must set {OMNI_LABELS}")
                continue
            selecting = [p for p in policies
                         if p["spec"].get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
                         and p["spec"].get("podSelector", {}).get("matchLabels")]
            if not selecting:
                problems.append(f"{doc['kind']}.{where}: no NetworkPolicy selects its pods")
    for policy in policies:
        spec, name = policy["spec"], policy["metadata"]["name"]
        if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
            problems.append(f"NetworkPolicy {name}: policyTypes must be [Ingress, Egress]")
        problems += _rule_problems(f"NetworkPolicy {name}.ingress", spec.get("ingress", []), "from")
        problems += _rule_problems(f"NetworkPolicy {name}.egress", spec.get("egress", []), "to")
        ingress_ports = [p for r in spec.get("ingress", []) for p in r.get("ports", [])]
        egress_ports = [p for r in spec.get("egress", []) for p in r.get("ports", [])]
        for needed, where, listed in ((RAY_INTERNAL, "ingress", ingress_ports), ({"protocol": "TCP", "port": 8265},
                                      "ingress", ingress_ports), (RAY_INTERNAL, "egress", egress_ports),
                                      ({"protocol": "UDP", "port": 53}, "egress", egress_ports),
                                      ({"protocol": "TCP", "port": 443}, "egress", egress_ports)):
            if needed not in listed:
                problems.append(f"NetworkPolicy {name}: {where} does not list {needed}")
        if any(p.get("port") == 10001 for p in ingress_ports):
            problems.append(f"NetworkPolicy {name}: the Ray client port 10001 is not needed; do not admit it")
    return problems


def image_problems(image: str) -> list[str]:
    """An image is pinned by a version tag, a digest, or both (``name:tag@sha256:<64 hex>``)."""
    name, _, digest = image.partition("@")
    if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return [f"{image!r}: the digest must be sha256:<64 hex digits>"]
    repo, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:  # no tag (a colon before a "/" is a registry port)
        repo, tag = name, ""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._/:-]*", repo) or (tag and not re.fullmatch(r"[\w][\w.-]{0,127}", tag)):
        return [f"{image!r} is not an image reference (name:tag or name[:tag]@sha256:<digest>)"]
    if not tag and not digest:
        return [f"{image!r} has neither tag nor digest: it means :latest, which changes under you"]
    if tag == "latest" and not digest:
        return [f"{image!r}: :latest is not a version; use a version tag or @sha256:<digest>"]
    return []


def rayjob_problems(doc: dict) -> list[str]:
    """A RayJob cleans up after itself and resubmits when its cluster is lost."""
    if doc["kind"] != "RayJob":
        return []
    spec, problems = doc["spec"], []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true")
    if "ttlSecondsAfterFinished" not in spec:
        problems.append("ttlSecondsAfterFinished must be set")
    if not isinstance(spec.get("backoffLimit"), int) or spec["backoffLimit"] < 1:
        problems.append("backoffLimit must be >= 1 so a lost cluster is recreated and the job resubmitted")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append("submissionMode must be K8sJobMode")
    if not str(spec.get("entrypoint", "")).startswith("omni-ray train /app/jobs/"):
        problems.append("entrypoint must be `omni-ray train /app/jobs/<config>.yaml`")
    return problems


def operator_rule_problems(doc: dict) -> list[str]:
    """Checks the KubeRay operator makes at reconcile time (ray-operator
    controllers/ray/utils/validation.go) that the CRD schema cannot express: a
    manifest breaking them applies cleanly and then never starts."""
    problems = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", doc["metadata"]["name"]):
        problems.append(f"metadata.name {doc['metadata']['name']!r} is not a DNS-1035 label")
    spec = _cluster_spec(doc)
    if spec:
        auth = spec.get("authOptions")
        if auth is not None and auth.get("mode", "token") == "token":  # token is the default
            version = tuple(int(x) for x in re.findall(r"\d+", spec.get("rayVersion", ""))[:3])
            if version < (2, 52, 0):
                problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
        v2 = spec.get("autoscalerOptions", {}).get("version") == "v2"
        groups = [("headGroupSpec", spec["headGroupSpec"])] + [
            (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))
        ]
        for where, group in groups:
            params = group.get("rayStartParams", {})
            resource_params = {"num-cpus", "num-gpus", "memory", "resources"} & params.keys()
            if group.get("resources") and resource_params:
                problems.append(f"{where}: resources set both in rayStartParams and resources")
            if "labels" in params:
                problems.append(f"{where}: rayStartParams['labels'] is not supported; use labels")
            if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                problems.append(f"{where}: restartPolicy must be Never or unset with autoscaler v2")
            if "idleTimeoutSeconds" in group and where != "headGroupSpec" and not v2:
                problems.append(f"{where}: idleTimeoutSeconds needs autoscalerOptions.version v2")
    if doc["kind"] == "RayJob":
        job = doc["spec"]
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    return problems


# --------------------------------------------------------------------------------------
# AWS cluster launcher
# --------------------------------------------------------------------------------------


@functools.cache
def _ray_launcher_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"ray-schema.json missing from the installed ray ({path})"
    return json.loads(path.read_text())


def _launcher_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(_ray_launcher_schema())
    return [f"{_path(e.absolute_path)}: {e.message[:300]}" for e in validator.iter_errors(config)]


def launcher_policy_problems(config: dict) -> list[str]:
    problems = []
    types = config.get("available_node_types", {})
    head_name = config.get("head_node_type")
    head = types.get(head_name)
    if head is None:
        return [f"head_node_type {head_name!r} is not in available_node_types"]
    if head.get("resources", {}).get("CPU") != 0:
        problems.append("head node type must advertise resources {CPU: 0}: no work on the head")
    if "InstanceMarketOptions" in head.get("node_config", {}):
        problems.append("head node must be on-demand (no InstanceMarketOptions)")
    workers = {n: t for n, t in types.items() if n != head_name}
    spot_gpu = [
        n
        for n, t in workers.items()
        if t.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        and t.get("resources", {}).get("GPU", 0) > 0
    ]
    if not spot_gpu:
        problems.append("no spot GPU worker node type (InstanceMarketOptions: {MarketType: spot})")
    for name, t in workers.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"{name}.min_workers must be 0 (scale from zero)")
        if t.get("max_workers", 0) < 1:
            problems.append(f"{name}.max_workers must be >= 1")
    for name, t in types.items():
        node = t.get("node_config", {})
        profile = node.get("IamInstanceProfile", {}).get("Name") or node.get("IamInstanceProfile", {}).get("Arn")
        if not profile or "ray-autoscaler" in str(profile):
            problems.append(f"{name}: set its own least-privilege IamInstanceProfile (Ray's default "
                            "ray-autoscaler-v1 has EC2 and S3 full access)")
        if node.get("MetadataOptions", {}).get("HttpTokens") != "required":
            problems.append(f"{name}: IMDSv2 must be required (node_config.MetadataOptions.HttpTokens: required)")
        if not node.get("SecurityGroupIds"):
            problems.append(f"{name}: name its SecurityGroupIds; the group Ray creates opens SSH to 0.0.0.0/0")
    for rule in config.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        if rule.get("FromPort", 0) <= 22 <= rule.get("ToPort", 65535) and any(
                r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            problems.append("provider.security_group opens SSH to 0.0.0.0/0")
    commands = " ".join(config.get("head_start_ray_commands", []))
    if "--dashboard-host=0.0.0.0" in commands:
        problems.append("head dashboard bound to 0.0.0.0; keep it on loopback and use `ray dashboard`")
    return problems


def _statements(cfn: dict) -> list[tuple[str, dict]]:
    out = []
    for name, res in cfn["Resources"].items():
        doc = res.get("Properties", {}).get("PolicyDocument")
        if isinstance(doc, dict):
            out += [(name, st) for st in doc.get("Statement", [])]
    return out


def iam_template_problems(cfn: dict) -> list[str]:
    """cluster/aws/iam.cfn.json grants only what the cluster needs."""
    problems = []
    ssh = cfn["Parameters"].get("SshCidr", {})
    if "Default" in ssh:
        problems.append("SshCidr must have no default: the user states who may SSH in")
    pattern = ssh.get("AllowedPattern", "")
    if not pattern or re.fullmatch(pattern, "0.0.0.0/0") or not re.fullmatch(pattern, "203.0.113.7/32"):
        problems.append("SshCidr's AllowedPattern must refuse 0.0.0.0/0 and accept a single address")
    for name, res in cfn["Resources"].items():
        for rule in res.get("Properties", {}).get("SecurityGroupIngress", []):
            if rule.get("FromPort") == 22 and rule.get("CidrIp") != {"Ref": "SshCidr"}:
                problems.append(f"{name}: SSH must come from SshCidr only")
            if rule.get("CidrIp") == "0.0.0.0/0":
                problems.append(f"{name}: ingress from 0.0.0.0/0")
    for name, st in _statements(cfn):
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        if any(a == "*" or a.endswith(":*") for a in actions):
            problems.append(f"{name}/{st.get('Sid')}: wildcard action {actions}")
        if any(a.startswith("s3:") for a in actions):
            resources = json.dumps(st["Resource"])
            if st["Resource"] == "*" or "${RunBucket}" not in resources and "${DataBucket}" not in resources:
                problems.append(f"{name}/{st.get('Sid')}: S3 access beyond the run's buckets ({resources})")
        if "iam:PassRole" in actions and st["Resource"] == "*":
            problems.append(f"{name}/{st.get('Sid')}: iam:PassRole on every role")
        if "ec2:TerminateInstances" in actions and "Condition" not in st:
            problems.append(f"{name}/{st.get('Sid')}: TerminateInstances on any instance, not only this cluster's")
    return problems


def _ray_prepared(config: dict) -> dict:
    """The config as `ray up` sees it: merged with Ray's AWS defaults, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _base_image(instructions: list[tuple[str, str]]) -> str:
    args = {}
    for instruction, rest in instructions:
        if instruction == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        if instruction == "FROM":
            image = rest.split()[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
    raise AssertionError("Dockerfile has no FROM")


def _pinned_ray_version() -> str:
    """The exact Ray version pinned in pyproject.toml's dependencies."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    m = re.search(r"""["']ray(\[[^\]]*\])?\s*==\s*([\w.]+)["']""", pyproject)
    assert m, "pyproject.toml pins no exact ray version (ray[...]==X.Y.Z)"
    return m.group(2)


# ======================================================================================
# Tests
# ======================================================================================


def test_manifests_are_discovered():
    assert KUBERAY_FILES, f"no YAML files in {KUBERAY_DIR}"
    assert AWS_FILES, f"no YAML files in {AWS_DIR}"
    kinds = {d["kind"] for f in KUBERAY_FILES for d in _ray_documents(f)}
    assert {"RayCluster", "RayJob"} <= kinds, f"ray.io kinds found: {kinds}"


def test_crd_schemas_are_loaded():
    schemas = _crd_schemas()
    assert ("ray.io/v1", "RayCluster") in schemas and ("ray.io/v1", "RayJob") in schemas, sorted(schemas)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_ids(KUBERAY_FILES))
def test_kuberay_manifest_matches_crd(path):
    docs = _documents(path)
    ray_docs = _ray_documents(path)
    assert ray_docs, f"{path.name} holds no ray.io document"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: incomplete document {doc}"
        assert doc["metadata"].get("name"), f"{path.name}: {doc['kind']} without metadata.name"
    for doc in ray_docs:
        errors = _crd_errors(doc)
        assert not errors, f"{path.name} {doc['kind']}/{doc['metadata']['name']}:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_ids(KUBERAY_FILES))
def test_kuberay_manifest_policies(path):
    problems = network_policy_problems(_documents(path))
    for doc in _documents(path):
        problems += secret_problems(doc)
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            problems += cluster_policy_problems(doc)
            problems += container_problems(doc)
            problems += rayjob_problems(doc)
            problems += operator_rule_problems(doc)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", AWS_FILES, ids=_ids(AWS_FILES))
def test_aws_launcher_config_matches_ray_schema(path):
    config = yaml.safe_load(path.read_text())
    errors = _launcher_errors(config)
    assert not errors, f"{path.name}:\n" + "\n".join(errors)
    prepared = _ray_prepared(config)  # raises on what Ray's own checks reject
    # Ray's AWS defaults pip-install a nightly Ray wheel in setup_commands; the config
    # must override them so the image's pinned Ray is what runs.
    setup = " ".join(
        command
        for key in (
            "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"
        )
        for command in prepared.get(key, [])
    )
    assert "ray-wheels" not in setup and "install -U \"ray" not in setup, setup


@pytest.mark.parametrize("path", AWS_FILES, ids=_ids(AWS_FILES))
def test_aws_launcher_policies(path):
    config = yaml.safe_load(path.read_text())
    problems = launcher_policy_problems(config) + secret_problems(config)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_all_deployments_use_one_image_and_the_pinned_ray():
    ray_version = _pinned_ray_version()
    images = set()
    for path in KUBERAY_FILES:
        for doc in _ray_documents(path):
            spec = _cluster_spec(doc)
            if spec:
                assert spec.get("rayVersion") == ray_version, f"{path.name}: rayVersion != {ray_version}"
            images |= {c["image"] for _, c, _ in _containers(doc) if "image" in c}
    for path in AWS_FILES:
        images.add(yaml.safe_load(path.read_text())["docker"]["image"])
    assert len(images) == 1, f"manifests use different images: {images}"
    assert not [p for image in images for p in image_problems(image)]


@pytest.mark.parametrize("image, ok", [
    ("ghcr.io/omni-ray/omni-ray:0.1.0", True),
    ("ghcr.io/omni-ray/omni-ray:0.1.0@sha256:" + "a" * 64, True),
    ("ghcr.io/omni-ray/omni-ray@sha256:" + "0123456789abcdef" * 4, True),
    ("registry.example:5000/omni-ray:0.1.0", True),
    ("ghcr.io/omni-ray/omni-ray", False),
    ("ghcr.io/omni-ray/omni-ray:latest", False),
    ("ghcr.io/omni-ray/omni-ray@sha256:abc", False),
])
def test_image_references_by_tag_or_digest(image, ok):
    assert (image_problems(image) == []) is ok, image_problems(image)


def test_image_dependencies_are_locked_with_hashes():
    from packaging.requirements import Requirement

    lock_text = (REPO_ROOT / "requirements.lock").read_text()
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\\n]+)", lock_text, flags=re.M))
    pinned = {name.lower().replace("_", "-"): version for name, version in pinned.items()}
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock_text.split("\n", 6)[-1])
    unhashed = [b.split()[0] for b in blocks if b.strip() and not b.startswith("#") and "--hash=sha256:" not in b]
    assert not unhashed, f"lock entries without hashes: {unhashed}"
    import tomllib

    for dep in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} (pyproject.toml) is not in requirements.lock; regenerate it"
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {req.specifier}"
    instructions = _dockerfile_instructions(DOCKERFILE.read_text())
    runs = " ".join(rest for i, rest in instructions if i == "RUN")
    assert "--require-hashes" in runs and "-r requirements.lock" in runs, "the Dockerfile must install the lock"
    assert any(i == "COPY" and "requirements.lock" in rest for i, rest in instructions)


def test_aws_iam_template_is_least_privilege():
    cfn = json.loads((AWS_DIR / "iam.cfn.json").read_text())
    assert iam_template_problems(cfn) == []
    launcher = yaml.safe_load(AWS_FILES[0].read_text())
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in launcher["available_node_types"].values()}
    defined = {r["Properties"]["InstanceProfileName"] for r in cfn["Resources"].values()
               if r["Type"] == "AWS::IAM::InstanceProfile"}
    assert profiles <= defined, f"the launcher uses profiles {profiles - defined} that iam.cfn.json does not create"


def test_security_checks_catch_open_manifests():
    cfn = json.loads((AWS_DIR / "iam.cfn.json").read_text())
    cfn["Parameters"]["SshCidr"]["AllowedPattern"] = ".*"
    cfn["Parameters"]["SshCidr"]["Default"] = "0.0.0.0/0"
    statements = cfn["Resources"]["WorkerS3Policy"]["Properties"]["PolicyDocument"]["Statement"]
    statements.append({"Effect": "Allow", "Action": "s3:*", "Resource": "*"})
    autoscaler = cfn["Resources"]["HeadAutoscalerPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    for st in autoscaler:
        if "iam:PassRole" in st["Action"]:
            st["Resource"] = "*"
        st.pop("Condition", None)
    problems = "\n".join(iam_template_problems(cfn))
    for expected in ("no default", "AllowedPattern", "wildcard action", "beyond the run's buckets",
                     "PassRole on every role", "TerminateInstances on any instance"):
        assert expected in problems, f"missed {expected!r}:\n{problems}"

    launcher = yaml.safe_load(AWS_FILES[0].read_text())
    for t in launcher["available_node_types"].values():
        t["node_config"].pop("MetadataOptions")
        t["node_config"].pop("SecurityGroupIds")
    head = launcher["available_node_types"][launcher["head_node_type"]]
    head["node_config"]["IamInstanceProfile"] = {"Name": "ray-autoscaler-v1"}
    launcher["provider"]["security_group"] = {"GroupName": "x", "IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    problems = "\n".join(launcher_policy_problems(launcher))
    for expected in ("IMDSv2", "SecurityGroupIds", "least-privilege IamInstanceProfile", "opens SSH to 0.0.0.0/0"):
        assert expected in problems, f"missed {expected!r}:\n{problems}"

    docs = _documents(KUBERAY_FILES[0])
    assert network_policy_problems([d for d in docs if d.get("kind") != "NetworkPolicy"]) == [
        "no NetworkPolicy: every pod in the Kubernetes cluster could reach GCS and the job API"]
    policy = next(d for d in docs if d.get("kind") == "NetworkPolicy")
    policy["spec"]["policyTypes"] = ["Ingress"]
    policy["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    policy["spec"]["ingress"].append({"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 10001}]})
    policy["spec"]["egress"] = [r for r in policy["spec"]["egress"] if "ipBlock" not in json.dumps(r)]
    ray_doc = next(d for d in docs if str(d.get("apiVersion", "")).startswith("ray.io/"))
    _cluster_spec(ray_doc)["headGroupSpec"]["template"]["metadata"]["labels"] = {}
    problems = "\n".join(network_policy_problems(docs))
    for expected in ("policyTypes", "admits every port", "admits addresses", "10001", "does not list {'protocol': "
                     "'TCP', 'port': 443}", "headGroupSpec: pod labels"):
        assert expected in problems, f"missed {expected!r}:\n{problems}"


def test_dockerfile_base_user_and_install():
    instructions = _dockerfile_instructions(DOCKERFILE.read_text())
    base = _base_image(instructions)
    assert base.startswith("rayproject/ray:"), f"FROM {base}: must be an official rayproject/ray image"
    assert base.split(":", 1)[1].startswith(_pinned_ray_version() + "-"), (
        f"FROM {base}: the tag must start with the Ray version pinned in pyproject.toml"
    )
    assert re.search(r"-cu\d+", base), f"FROM {base}: needs a CUDA (-cuXYZ) image"
    users = [rest for instruction, rest in instructions if instruction == "USER"]
    assert users, "Dockerfile has no USER line; containers would run as root"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0"), f"final USER is {users[-1]}"
    env_and_args = " ".join(rest for i, rest in instructions if i in ("ENV", "ARG"))
    assert re.search(r"\bDS_BUILD_OPS=0\b", env_and_args), "set DS_BUILD_OPS=0"
    assert ("WORKDIR", "/app") in instructions
    assert any(i == "COPY" and re.search(r"\bjobs/? ", rest + " ") for i, rest in instructions), (
        "Dockerfile must copy jobs/ to /app/jobs (the RayJob entrypoint reads it)"
    )


def test_dockerignore_keeps_local_state_out():
    entries = {
        line.strip().lstrip("*/").rstrip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    missing = {".venv", ".git", "__pycache__", ".whl", "tests"} - entries
    assert not missing, f".dockerignore lacks {missing}"


def test_rayjob_entrypoint_config_exists_in_jobs():
    for path in KUBERAY_FILES:
        for doc in _ray_documents(path):
            if doc["kind"] != "RayJob":
                continue
            config = doc["spec"]["entrypoint"].split()[-1]
            local = REPO_ROOT / "jobs" / Path(config).relative_to("/app/jobs")
            assert local.is_file(), (
                f"{path.name}: entrypoint reads {config}, but {local.relative_to(REPO_ROOT)} "
                "does not exist (the Dockerfile copies jobs/ to /app/jobs/)"
            )


# --------------------------------------------------------------------------------------
# Negative tests: the validators and policies do catch broken manifests
# --------------------------------------------------------------------------------------


def _first(kind: str) -> dict:
    for path in KUBERAY_FILES:
        for doc in _ray_documents(path):
            if doc["kind"] == kind:
                return copy.deepcopy(doc)
    raise AssertionError(f"no {kind} manifest")


def test_crd_validation_rejects_wrong_types_enums_and_unknown_fields():
    cluster = _first("RayCluster")
    assert _crd_errors(cluster) == []

    unquoted = copy.deepcopy(cluster)  # the classic YAML slip: num-cpus: 0
    unquoted["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("rayStartParams.num-cpus" in e and "string" in e for e in _crd_errors(unquoted))

    wrong_int = copy.deepcopy(cluster)
    wrong_int["spec"]["workerGroupSpecs"][0]["minReplicas"] = "0"
    assert any("minReplicas" in e and "integer" in e for e in _crd_errors(wrong_int))

    bad_enum = copy.deepcopy(cluster)
    bad_enum["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert any("upscalingMode" in e for e in _crd_errors(bad_enum))

    missing = copy.deepcopy(cluster)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in _crd_errors(missing))

    job = _first("RayJob")
    assert _crd_errors(job) == []
    job["spec"]["backoffLimit"] = "three"
    assert any("backoffLimit" in e for e in _crd_errors(job))


def test_strict_mode_catches_misspelled_fields_that_the_api_server_would_prune():
    cluster = _first("RayCluster")
    cluster["spec"]["enableInTreeAutoScaling"] = True  # capital S: not a field
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["terminationGracePeriod"] = 120
    errors = _crd_errors(cluster)
    assert any("enableInTreeAutoScaling" in e for e in errors), errors
    assert any("terminationGracePeriod'" in e for e in errors), errors
    # The CRD as shipped would accept both silently (pruned on apply): strictness is ours.
    raw = yaml.load((KUBERAY_SCHEMA_DIR / "ray.io_rayclusters.yaml").read_text(), Loader=_Loader)
    v1 = next(v for v in raw["spec"]["versions"] if v["name"] == "v1")
    assert jsonschema.Draft4Validator(v1["schema"]["openAPIV3Schema"]).is_valid(cluster)


def test_policies_catch_unsafe_manifests():
    job = _first("RayJob")
    spec = job["spec"]["rayClusterSpec"]
    head, worker = spec["headGroupSpec"], spec["workerGroupSpecs"][0]
    head["rayStartParams"]["num-cpus"] = "8"
    head["serviceType"] = "LoadBalancer"
    head["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"][0]["values"] = ["spot"]
    worker["minReplicas"] = 1
    worker_pod = worker["template"]["spec"]
    del worker_pod["affinity"]
    worker_pod["terminationGracePeriodSeconds"] = 30
    worker_pod["containers"][0]["securityContext"]["runAsNonRoot"] = False
    worker_pod["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["backoffLimit"] = 0

    problems = "\n".join(
        cluster_policy_problems(job) + container_problems(job) + secret_problems(job) + rayjob_problems(job)
    )
    for expected in (
        "num-cpus",
        "on-demand",
        "LoadBalancer",
        "minReplicas",
        "spot nodes",
        "terminationGracePeriodSeconds must be > 60",
        "must exceed Ray's drain",
        "runAsNonRoot",
        "AWS_SECRET_ACCESS_KEY has a literal value",
        "shutdownAfterJobFinishes",
        "backoffLimit",
    ):
        assert expected in problems, f"policy missed {expected!r}:\n{problems}"

    assert secret_problems({"kind": "Secret", "stringData": {"auth_token": "x"}})
    assert secret_problems({"env": [{"name": "X", "value": "AKIAABCDEFGHIJKLMNOP"}]})


def test_operator_rules_catch_what_the_crd_lets_through():
    job = _first("RayJob")
    assert operator_rule_problems(job) == []
    job["metadata"]["name"] = "MiniCPM_lora"
    spec = job["spec"]["rayClusterSpec"]
    spec["rayVersion"] = "2.50.0"
    spec["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"] = "Always"
    spec["headGroupSpec"]["resources"] = {"CPU": "0"}
    job["spec"]["shutdownAfterJobFinishes"] = False
    assert _crd_errors(job) == []  # all of it is schema-valid
    problems = "\n".join(operator_rule_problems(job))
    for expected in (
        "DNS-1035", "2.52.0", "restartPolicy", "both in rayStartParams", "ttlSecondsAfterFinished"
    ):
        assert expected in problems, f"missed {expected!r}:\n{problems}"


def test_launcher_checks_catch_broken_configs():
    config = yaml.safe_load(AWS_FILES[0].read_text())
    assert _launcher_errors(config) == []

    wrong_type = copy.deepcopy(config)
    worker = next(n for n in wrong_type["available_node_types"] if n != wrong_type["head_node_type"])
    wrong_type["available_node_types"][worker]["min_workers"] = "0"
    assert any("min_workers" in e for e in _launcher_errors(wrong_type))

    unknown = copy.deepcopy(config)
    unknown["max_worker"] = 4  # typo of max_workers
    assert _launcher_errors(unknown)

    unsafe = copy.deepcopy(config)
    unsafe["available_node_types"][unsafe["head_node_type"]]["resources"] = {"CPU": 8}
    unsafe["available_node_types"][worker]["node_config"].pop("InstanceMarketOptions")
    unsafe["available_node_types"][worker]["min_workers"] = 2
    problems = "\n".join(launcher_policy_problems(unsafe))
    for expected in ("CPU: 0", "no spot GPU worker", "min_workers must be 0"):
        assert expected in problems, f"policy missed {expected!r}:\n{problems}"


def test_missing_crd_schemas_fail_loudly(monkeypatch, tmp_path):
    monkeypatch.setitem(globals(), "KUBERAY_SCHEMA_DIR", tmp_path / "nowhere")
    _crd_schemas.cache_clear()
    try:
        with pytest.raises(pytest.fail.Exception, match="KubeRay CRD schemas not found"):
            _crd_schemas()
    finally:
        monkeypatch.undo()
        _crd_schemas.cache_clear()
