"""Offline validation of rendered (or hand-written) manifests: no API server needed.

Three layers, each finding naming the document, the path, the rule and the fix:

1. **CRD schema** (RayService, RayCluster): the OpenAPI v3 schema of the CRDs the user points at
   (``--crd-dir``), with ``default:`` values applied first, as the API server does; unknown fields are
   errors (``kubectl apply``'s strict field validation).
2. **KubeRay operator rules** (``VALIDATION_RULES.md`` beside the v1.7.0 CRDs): the metadata, cluster-spec
   and RayService rules, with the v1.7.0 feature-gate defaults; rule ids as there (M3, C9, S4, ...).
3. **Kubernetes and gpuserve rules**: every pod template and core object against Kubernetes' own schemas
   (``kubernetes-validate``); GPU groups tolerate the GPU taint; extended resources have requests equal to
   limits; the head has no GPUs; the dashboard, GCS and Ray client are never exposed outside the cluster;
   Ray's token auth is on; a deployment that can scale to zero still has a Serve endpoint to wake it; a
   side-by-side or incremental upgrade fits the GPU pools' ``max_nodes``. Warnings (the manifest works,
   but is exposed or fragile): no NetworkPolicy for the RayService, a hostPath volume, GPU workers
   without a draining preStop hook, an upgrade that fits only while the old cluster is small.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from serving.pools import POOL_MAX_NODES_LABEL

__all__ = ["Finding", "UpgradeFit", "load_crd_schemas", "upgrade_fits", "validate_documents", "validate_file"]

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
CONTROL_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client"}
GPU = "nvidia.com/gpu"
MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
# The labels KubeRay puts on every pod it creates, besides the template's own; the renderer selects this
# RayService's pods by the first (with the service label).
KUBERAY_CREATED_BY = {"app.kubernetes.io/created-by": "kuberay-operator"}
KUBERAY_POD_LABELS = {**KUBERAY_CREATED_BY, "app.kubernetes.io/name": "kuberay"}
# A worker group without maxReplicas gets the CRD default.
UNBOUNDED = 2147483647


@dataclass(frozen=True)
class Finding:
    """One problem: where (document, path), which rule, what, and how to fix it.

    ``severity`` is ``error`` (the manifest is rejected or does not work) or ``warning`` (it works, but is
    exposed or fragile); ``gpuserve validate`` fails on errors only.
    """

    document: str
    path: str
    rule: str
    message: str
    fix: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{prefix}{self.document}: {self.path}: [{self.rule}] {self.message}; fix: {self.fix}"


# -- CRD schemas --------------------------------------------------------------------------------------


def load_crd_schemas(crd_dir: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): openAPIV3Schema} for every served version of every CRD in ``crd_dir``.

    Raises:
        FileNotFoundError: no CRD files there.
    """
    return dict(_load_crd_schemas(str(Path(crd_dir).resolve())))


@functools.lru_cache(maxsize=8)
def _load_crd_schemas(crd_dir: str) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    # libyaml when present: the four KubeRay CRDs are 75,000 lines.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(Path(crd_dir).glob("*.y*ml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for v in doc["spec"]["versions"]:
                if v.get("served", True) and "schema" in v:
                    out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    if not out:
        raise FileNotFoundError(f"no CustomResourceDefinition found in {crd_dir}; point --crd-dir at your cluster's CRDs")
    return out


def _p(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


class _Schema:
    """Structural-schema checks with defaulting; collects (path, message, fix)."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str, str]] = []

    def err(self, path: str, msg: str, fix: str) -> None:
        self.errors.append((path, msg, fix))

    def check(self, s: dict[str, Any], v: Any, path: str) -> None:
        if v is None:
            if not s.get("nullable"):
                self.err(path, "is null", "remove the field or give it a value")
            return
        if s.get("x-kubernetes-int-or-string"):
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                self.err(path, f"must be an integer or a string, got {type(v).__name__}", "use a number or a quoted string")
            return
        t = s.get("type")
        if t == "object" or (t is None and "properties" in s):
            self._object(s, v, path)
        elif t == "array":
            self._array(s, v, path)
        elif t == "string":
            if not isinstance(v, str):
                self.err(path, f"must be a string, got {type(v).__name__} {v!r}", f'quote it: "{v}"')
                return
            if "enum" in s and v not in s["enum"]:
                self.err(path, f"{v!r} is not one of {s['enum']}", f"use one of {s['enum']}")
            if "maxLength" in s and len(v) > s["maxLength"]:
                self.err(path, f"longer than {s['maxLength']} characters", "shorten it")
            if "minLength" in s and len(v) < s["minLength"]:
                self.err(path, f"shorter than {s['minLength']} characters", "lengthen it")
            if "pattern" in s and not re.search(s["pattern"], v):
                self.err(path, f"{v!r} does not match {s['pattern']}", "change the value to match the pattern")
        elif t == "integer":
            if isinstance(v, bool) or not isinstance(v, int):
                self.err(path, f"must be an integer, got {type(v).__name__} {v!r}", "write a whole number without quotes")
                return
            self._bounds(s, v, path)
        elif t == "number":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.err(path, f"must be a number, got {type(v).__name__} {v!r}", "write a number without quotes")
                return
            self._bounds(s, v, path)
        elif t == "boolean" and not isinstance(v, bool):
            self.err(path, f"must be true or false, got {v!r}", "write true or false without quotes")

    def _bounds(self, s: dict[str, Any], v: float, path: str) -> None:
        if "minimum" in s and v < s["minimum"]:
            self.err(path, f"{v} is below the minimum {s['minimum']}", f"use a value >= {s['minimum']}")
        if "maximum" in s and v > s["maximum"]:
            self.err(path, f"{v} is above the maximum {s['maximum']}", f"use a value <= {s['maximum']}")

    def _object(self, s: dict[str, Any], v: Any, path: str) -> None:
        if not isinstance(v, dict):
            self.err(path, f"must be a mapping, got {type(v).__name__}", "write a mapping of key: value")
            return
        props = s.get("properties") or {}
        for k, ps in props.items():
            if k not in v and "default" in ps:
                v[k] = copy.deepcopy(ps["default"])  # the API server's defaulting, before `required`
        for k in s.get("required", []):
            if k not in v:
                self.err(_p(path, k), "is required", f"add {k}")
        addl = s.get("additionalProperties")
        if not props and addl is None:
            return  # a bare `type: object` (e.g. metadata): the API server checks it, not the CRD schema
        for k, item in v.items():
            if k in props:
                self.check(props[k], item, _p(path, k))
            elif isinstance(addl, dict):
                self.check(addl, item, _p(path, k))
            elif addl is True or s.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                self.err(_p(path, k), "is not a field of this object (unknown fields are rejected)", "remove it or fix its name")

    def _array(self, s: dict[str, Any], v: Any, path: str) -> None:
        if not isinstance(v, list):
            self.err(path, f"must be a list, got {type(v).__name__}", "write a list")
            return
        items = s.get("items") or {}
        for i, item in enumerate(v):
            self.check(items, item, _p(path, i))
        if s.get("x-kubernetes-list-type") == "map":
            keys = s.get("x-kubernetes-list-map-keys", [])
            seen: dict[tuple, int] = {}
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    k = tuple(item.get(x) for x in keys)
                    if k in seen:
                        self.err(_p(path, i), f"duplicate {'/'.join(keys)} {k if len(k) > 1 else k[0]!r}", "make each entry's key unique")
                    seen[k] = i
        if "maxItems" in s and len(v) > s["maxItems"]:
            self.err(path, f"more than {s['maxItems']} items", "remove some")


# -- operator rules (KubeRay v1.7.0, default feature gates) -------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e.get("name"): e.get("value") for e in container.get("env") or [] if isinstance(e, dict)}


def _truthy(x: Any) -> bool:
    return str(x).lower() in ("1", "true")


def _version(v: Any) -> Optional[tuple[int, ...]]:
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(v or ""))
    return tuple(int(g or 0) for g in m.groups()) if m else None


def _labels_ok(labels: Any, group: str, base: str, out: list) -> None:
    for k, v in (labels or {}).items():
        name = k.split("/", 1)[-1]
        if not QUALIFIED_NAME.match(name) or len(name) > 63:
            out.append((f"{base}.labels", "C4/C12", f"invalid label key for {group} group: {k!r}", "use a qualified name: [prefix/]name, name at most 63 characters"))
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            out.append((f"{base}.labels.{k}", "C4/C12", f"invalid label value for key {k!r} in {group} group: {v!r}", "use at most 63 letters, digits, '-', '_', '.'"))


def _resources_in_one_place(g: dict, name: str, base: str, rule: str, out: list) -> None:
    rsp = g.get("rayStartParams") or {}
    if any(k in rsp for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
        out.append((base, rule, f"resource fields should not be set in both rayStartParams and Resources for {name} group", "declare Ray resources in one place: rayStartParams or resources"))


def cluster_rules(c: dict[str, Any], annotations: dict[str, str], base: str) -> list[tuple[str, str, str, str]]:
    """The C and U rules on a cluster spec; (path, rule, message, fix)."""
    out: list[tuple[str, str, str, str]] = []
    head = c.get("headGroupSpec") or {}
    hpod = ((head.get("template") or {}).get("spec")) or {}
    hcs = hpod.get("containers") or []
    hb = f"{base}.headGroupSpec"
    if not hcs:
        out.append((f"{hb}.template.spec.containers", "C1", "headGroupSpec should have at least one container", "add the Ray head container"))
    _resources_in_one_place(head, "Head", hb, "C2", out)
    if "labels" in (head.get("rayStartParams") or {}):
        out.append((f"{hb}.rayStartParams.labels", "C3", "rayStartParams['labels'] is not supported for Head group", "use headGroupSpec.labels"))
    _labels_ok(head.get("labels"), "Head", hb, out)
    autoscaling = bool(c.get("enableInTreeAutoscaling"))
    aopts = c.get("autoscalerOptions") or {}
    henv = _env(hcs[0]) if hcs else {}
    v2 = aopts.get("version") == "v2" or _truthy(henv.get("RAY_enable_autoscaler_v2"))
    for i, g in enumerate(c.get("workerGroupSpecs") or []):
        name, gb = g.get("groupName"), f"{base}.workerGroupSpecs[{i}]"
        if not ((g.get("template") or {}).get("spec") or {}).get("containers"):
            out.append((f"{gb}.template.spec.containers", "C5", "workerGroupSpec should have at least one container", "add the Ray worker container"))
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            out.append((gb, "C6", f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled", "set both"))
        if isinstance(lo, int) and lo < 0:
            out.append((f"{gb}.minReplicas", "C7", f"worker group {name} has negative minReplicas {lo}", "use 0 or more"))
        if isinstance(hi, int) and hi < 0:
            out.append((f"{gb}.maxReplicas", "C8", f"worker group {name} has negative maxReplicas {hi}", "use 0 or more"))
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            out.append((gb, "C9", f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}", "raise maxReplicas or lower minReplicas"))
        _resources_in_one_place(g, str(name), gb, "C10", out)
        if "labels" in (g.get("rayStartParams") or {}):
            out.append((f"{gb}.rayStartParams.labels", "C11", f"rayStartParams['labels'] is not supported for {name} group", "use the group's labels field"))
        _labels_ok(g.get("labels"), str(name), gb, out)
        idle = g.get("idleTimeoutSeconds")
        if idle is not None:
            if isinstance(idle, int) and idle < 0:
                out.append((f"{gb}.idleTimeoutSeconds", "C13", f"worker group {name}: idleTimeoutSeconds must be non-negative, got {idle}", "use 0 or more"))
            if not v2:
                out.append((f"{gb}.idleTimeoutSeconds", "C14", f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled", "set autoscalerOptions.version: v2"))
        if g.get("priority"):
            ver = _version(c.get("rayVersion"))
            if not c.get("rayVersion"):
                out.append((f"{gb}.priority", "C15", f"worker group {name}: priority is set, but RayVersion was not specified", "set rayVersion >= 2.56.0"))
            elif ver is None:
                out.append(("rayVersion", "C16", f"worker group {name}: priority is set, but RayVersion format is invalid", "write rayVersion like 2.60.0"))
            elif ver < (2, 56, 0):
                out.append(("rayVersion", "C17", f"worker group {name}: priority is set, but minimum Ray version is 2.56.0", "use Ray >= 2.56.0"))
            if not v2:
                out.append((f"{gb}.priority", "C18", f"worker group {name}: priority is set, but autoscaler v2 is not enabled", "set autoscalerOptions.version: v2"))
        if autoscaling and g.get("suspend"):
            out.append((f"{gb}.suspend", "C38", f"worker group {name} cannot be suspended with Autoscaler enabled", "remove suspend"))
        if autoscaling and aopts.get("version") == "v2" and ((g.get("template") or {}).get("spec") or {}).get("restartPolicy") not in (None, "Never"):
            out.append((f"{gb}.template.spec.restartPolicy", "C41", f"restartPolicy for worker group {name} should be Never or unset when using autoscaler V2", "remove restartPolicy"))
    ft_annot = annotations.get("ray.io/ft-enabled")
    ft_opts = c.get("gcsFaultToleranceOptions")
    if ft_annot and ft_opts:
        out.append(("metadata.annotations", "C19", "ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set", "use only gcsFaultToleranceOptions"))
    ft_on = str(ft_annot).lower() == "true" or bool(ft_opts)
    if not ft_on and "RAY_REDIS_ADDRESS" in henv:
        out.append((f"{hb}.template.spec.containers[0].env", "C20", "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance", "use gcsFaultToleranceOptions"))
    if ft_opts:
        if "redis-password" in (head.get("rayStartParams") or {}):
            out.append((f"{hb}.rayStartParams", "C21", "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled", "use gcsFaultToleranceOptions.redisPassword"))
        for env, rule in (("REDIS_PASSWORD", "C22"), ("RAY_REDIS_ADDRESS", "C23")):
            if env in henv:
                out.append((f"{hb}.template.spec.containers[0].env", rule, f"cannot set `{env}` env var in head Pod when GcsFaultToleranceOptions is enabled", "use gcsFaultToleranceOptions"))
        if "ray.io/external-storage-namespace" in annotations:
            out.append(("metadata.annotations", "C24", "cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is enabled", "use gcsFaultToleranceOptions.externalStorageNamespace"))
        backend = ft_opts.get("backend") or "redis"
        if backend == "rocksdb":
            out.append((f"{base}.gcsFaultToleranceOptions.backend", "C25", "the embedded RocksDB GCS fault tolerance backend requires the GCSFaultToleranceEmbeddedStorage feature gate to be enabled", "use the redis backend, or enable the gate on the operator"))
        elif ft_opts.get("storage") is not None:
            out.append((f"{base}.gcsFaultToleranceOptions.storage", "C34", "cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'", "remove storage"))
    if "redis-username" in (head.get("rayStartParams") or {}) or "REDIS_USERNAME" in henv:
        out.append((hb, "C35", "cannot set redis username in rayStartParams or environment variables", "use gcsFaultToleranceOptions.redisUsername"))
    if not autoscaling and _truthy(henv.get("RAY_enable_autoscaler_v2")):
        out.append((f"{hb}.template.spec.containers[0].env", "C37", "environment variable RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false", "remove it or enable autoscaling"))
    if autoscaling and aopts.get("version") and "RAY_enable_autoscaler_v2" in henv:
        out.append((f"{base}.autoscalerOptions.version", "C39", "both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set", "keep autoscalerOptions.version only"))
    if autoscaling and aopts.get("version") == "v2" and hpod.get("restartPolicy") not in (None, "Never"):
        out.append((f"{hb}.template.spec.restartPolicy", "C40", "restartPolicy for head Pod should be Never or unset when using autoscaler V2", "remove restartPolicy"))
    idle = aopts.get("idleTimeoutSeconds")
    if isinstance(idle, int) and idle < 0:
        out.append((f"{base}.autoscalerOptions.idleTimeoutSeconds", "C42", f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {idle}", "use 0 or more"))
    if any(isinstance(e, dict) and e.get("name") == "KUBERAY_GEN_AUTOSCALER_START_CMD" for e in aopts.get("env") or []):
        out.append((f"{base}.autoscalerOptions.env", "C43", "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD", "remove it; KubeRay injects it"))
    for key, rule, gate in (("historyServerOptions", "C44", "RayClusterHistoryServer"), ("networkPolicy", "C58", "RayClusterNetworkPolicy"), ("tlsOptions", "C67", "RayClusterMTLS")):
        if c.get(key) is not None:
            out.append((f"{base}.{key}", rule, f"{key} requires the {gate} feature gate to be enabled (off by default in v1.7.0)", f"remove {key}, or enable the gate on the operator"))
    auth = c.get("authOptions") or {}
    if auth.get("mode") == "token":
        ver = _version(c.get("rayVersion"))
        if not c.get("rayVersion"):
            out.append((f"{base}.rayVersion", "C52", "authOptions.mode is 'token' but RayVersion was not specified", "set rayVersion >= 2.52.0"))
        elif ver is None:
            out.append((f"{base}.rayVersion", "C53", "authOptions.mode is 'token' but RayVersion format is invalid", "write rayVersion like 2.60.0"))
        elif ver < (2, 52, 0):
            out.append((f"{base}.rayVersion", "C54", f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {c.get('rayVersion')}", "use Ray >= 2.52.0"))
        elif auth.get("enableK8sTokenAuth") and ver < (2, 55, 0):
            out.append((f"{base}.rayVersion", "C55", "authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0", "use Ray >= 2.55.0"))
    if auth.get("enableK8sTokenAuth"):
        if auth.get("secretName"):
            out.append((f"{base}.authOptions.secretName", "C56", "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set", "use one of them"))
        if auth.get("mode") != "token":
            out.append((f"{base}.authOptions.mode", "C57", "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'", "set mode: token"))
    if (c.get("managedBy") is not None) and c.get("managedBy") not in MANAGED_BY:
        out.append((f"{base}.managedBy", "X1", f"the managedBy field value must be either {' or '.join(MANAGED_BY)}", "remove managedBy or use one of those"))
    return out


def _name_rules(name: str, kind: str, most: int, rules: tuple[str, str]) -> list[tuple[str, str, str, str]]:
    out = []
    if len(name) > most:
        out.append(("metadata.name", rules[0], f"{kind} name should be no more than {most} characters", "shorten the name (the operator derives longer names from it)"))
    if not DNS1035.match(name):
        out.append(("metadata.name", rules[1], f"{kind} name should be a valid DNS1035 label: {name!r}", "use lowercase letters, digits and '-', starting with a letter"))
    return out


def _unique_groups(c: dict[str, Any], base: str) -> list[tuple[str, str, str, str]]:
    names = [g.get("groupName") for g in c.get("workerGroupSpecs") or [] if isinstance(g, dict)]
    return [
        (f"{base}.workerGroupSpecs[{i}].groupName", "W1", f"worker group names must be unique: {n!r} appears twice", "rename one of the groups")
        for i, n in enumerate(names)
        if n in names[:i]
    ]


def rayservice_rules(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """M3-M5, W1, S1-S9 (C via ``cluster_rules``), U2, and that serveConfigV2 parses."""
    out: list[tuple[str, str, str, str]] = []
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    out += _name_rules(str(meta.get("name", "")), "RayService", 47, ("M3", "M4"))
    ann = meta.get("annotations") or {}
    to = ann.get("ray.io/initializing-timeout")
    if to and not re.match(r"^([1-9]\d*|(\d+(\.\d+)?(ns|us|ms|s|m|h))+)$", str(to)):
        out.append(("metadata.annotations", "M5", "annotation ray.io/initializing-timeout must be a positive duration or integer seconds", "write e.g. 5m or 300"))
    c = spec.get("rayClusterConfig") or {}
    base = "spec.rayClusterConfig"
    if (c.get("authOptions") or {}).get("enableK8sTokenAuth"):
        out.append((f"{base}.authOptions.enableK8sTokenAuth", "S1", "K8s token auth mode is currently not supported for RayService", "use authOptions.mode: token with a secret"))
    out += cluster_rules(c, ann, base)
    if (((c.get("headGroupSpec") or {}).get("headService") or {}).get("metadata") or {}).get("name"):
        out.append((f"{base}.headGroupSpec.headService.metadata.name", "S3", "spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set", "remove it; the operator names the head service"))
    us = spec.get("upgradeStrategy") or {}
    t = us.get("type")
    if t is not None and t not in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
        out.append(("spec.upgradeStrategy.type", "S4", f"Spec.UpgradeStrategy.Type value {t} is invalid", "use NewClusterWithIncrementalUpgrade, NewCluster or None"))
    d = spec.get("rayClusterDeletionDelaySeconds")
    if isinstance(d, int) and d < 0:
        out.append(("spec.rayClusterDeletionDelaySeconds", "S5", "Spec.RayClusterDeletionDelaySeconds should be a non-negative integer", "use 0 or more"))
    if t == "NewClusterWithIncrementalUpgrade":
        if not c.get("enableInTreeAutoscaling"):
            out.append((f"{base}.enableInTreeAutoscaling", "S6", "Ray Autoscaler is required for NewClusterWithIncrementalUpgrade", "set enableInTreeAutoscaling: true"))
        o = us.get("clusterUpgradeOptions")
        if not o:
            out.append(("spec.upgradeStrategy.clusterUpgradeOptions", "S7", "ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade", "add clusterUpgradeOptions"))
        else:
            surge, step, interval = o.get("maxSurgePercent", 100), o.get("stepSizePercent"), o.get("intervalSeconds")
            if not (isinstance(surge, int) and 0 <= surge <= 100):
                out.append(("spec.upgradeStrategy.clusterUpgradeOptions.maxSurgePercent", "S8", "maxSurgePercent must be between 0 and 100", "use 0-100"))
            if not (isinstance(step, int) and 0 <= step <= 100):
                out.append(("spec.upgradeStrategy.clusterUpgradeOptions.stepSizePercent", "S8", "stepSizePercent must be between 0 and 100", "use 0-100"))
            elif isinstance(surge, int) and step > surge:
                out.append(("spec.upgradeStrategy.clusterUpgradeOptions.stepSizePercent", "S8", "stepSizePercent must be less than or equal to maxSurgePercent", "lower stepSizePercent"))
            if not (isinstance(interval, int) and interval > 0):
                out.append(("spec.upgradeStrategy.clusterUpgradeOptions.intervalSeconds", "S8", "intervalSeconds must be greater than 0", "use a positive number"))
            if not o.get("gatewayClassName"):
                out.append(("spec.upgradeStrategy.clusterUpgradeOptions.gatewayClassName", "S9", "gatewayClassName is required for NewClusterWithIncrementalUpgrade", "name your Gateway class"))
    if (c.get("upgradeStrategy") or {}).get("type") is not None:
        out.append((f"{base}.upgradeStrategy.type", "U2", "upgradeStrategy cannot be set when RayCluster is created by RayService", "remove it; use spec.upgradeStrategy"))
    out += _unique_groups(c, base)
    cfg = spec.get("serveConfigV2")
    if cfg is not None:
        try:
            parsed = yaml.safe_load(cfg) if isinstance(cfg, str) else None
        except yaml.YAMLError as e:
            parsed, why = None, str(e).splitlines()[0]
        else:
            why = "it is not a YAML mapping with an 'applications' list"
        if not isinstance(parsed, dict) or not isinstance(parsed.get("applications"), list):
            out.append(("spec.serveConfigV2", "S-config", f"serveConfigV2 does not parse as a Serve config: {why}", "write a YAML string with a top-level 'applications' list"))
    return out


def raycluster_rules(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """M1, M2, W1 and the C and U1 rules on a RayCluster."""
    out: list[tuple[str, str, str, str]] = []
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    out += _name_rules(str(meta.get("name", "")), "RayCluster", 53, ("M1", "M2"))
    out += cluster_rules(spec, meta.get("annotations") or {}, "spec")
    t = (spec.get("upgradeStrategy") or {}).get("type")
    if t is not None and t not in ("Recreate", "None"):
        out.append(("spec.upgradeStrategy.type", "U1", f"Spec.UpgradeStrategy.Type value {t} is invalid", "use Recreate or None"))
    out += _unique_groups(spec, "spec")
    return out


# -- gpuserve and Kubernetes pod rules -----------------------------------------------------------------


def _cluster(kind: str, doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The cluster spec of a RayService (``spec.rayClusterConfig``) or RayCluster (``spec``), and its path."""
    if kind == "RayService":
        return ((doc.get("spec") or {}).get("rayClusterConfig") or {}), "spec.rayClusterConfig"
    return (doc.get("spec") or {}), "spec"


def _pod_templates(kind: str, doc: dict[str, Any]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(role, path, template) of every pod template in a RayService/RayCluster."""
    c, base = _cluster(kind, doc)
    head = c.get("headGroupSpec") or {}
    if isinstance(head.get("template"), dict):
        yield "head", f"{base}.headGroupSpec.template", head["template"]
    for i, g in enumerate(c.get("workerGroupSpecs") or []):
        if isinstance(g, dict) and isinstance(g.get("template"), dict):
            yield str(g.get("groupName")), f"{base}.workerGroupSpecs[{i}].template", g["template"]


def _gpu_count(container: dict[str, Any], which: str) -> int:
    v = ((container.get("resources") or {}).get(which) or {}).get(GPU)
    try:
        return int(v) if v is not None else 0
    except (TypeError, ValueError):
        return 0


def pod_rules(kind: str, doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    for role, path, t in _pod_templates(kind, doc):
        pod = t.get("spec") or {}
        containers = pod.get("containers") or []
        gpus = 0
        for j, ct in enumerate(containers):
            res = ct.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            for key in set(req) | set(lim):
                if "/" in key and (key not in lim or (key in req and str(req[key]) != str(lim[key]))):
                    out.append((f"{path}.spec.containers[{j}].resources", "k8s/extended-resource", f"{key}: requests ({req.get(key)}) must equal limits ({lim.get(key)}); extended resources cannot be overcommitted", f"set limits.{key} equal to requests.{key}"))
            gpus += max(_gpu_count(ct, "limits"), _gpu_count(ct, "requests"))
        if role == "head":
            rsp = (_cluster(kind, doc)[0].get("headGroupSpec") or {}).get("rayStartParams") or {}
            if gpus or str(rsp.get("num-gpus", "0")) not in ("0", ""):
                out.append((path, "gpuserve/head-gpu", "the head pod has GPUs: it runs no model, so they would sit idle", f"remove {GPU} from the head container and num-gpus from its rayStartParams"))
            continue
        if gpus:
            tolerated = any(
                tol.get("key") == GPU and tol.get("effect") in (None, "", "NoSchedule") for tol in pod.get("tolerations") or []
            ) or any(tol.get("operator") == "Exists" and not tol.get("key") for tol in pod.get("tolerations") or [])
            if not tolerated:
                out.append((f"{path}.spec.tolerations", "gpuserve/gpu-toleration", f"worker group {role} asks for GPUs but does not tolerate the {GPU}:NoSchedule taint of GPU nodes", f"add a toleration {{key: {GPU}, operator: Exists, effect: NoSchedule}}"))
    c, cbase = _cluster(kind, doc)
    head = c.get("headGroupSpec") or {}
    base = f"{cbase}.headGroupSpec"
    if head.get("serviceType") in ("LoadBalancer", "NodePort"):
        out.append((f"{base}.serviceType", "gpuserve/control-plane-exposed", f"the head service is {head['serviceType']}: the dashboard, GCS and Ray client would be reachable from outside the cluster", "use ClusterIP and expose only the Serve port (an Ingress or Gateway to the serve service)"))
    if head.get("enableIngress"):
        out.append((f"{base}.enableIngress", "gpuserve/control-plane-exposed", "enableIngress exposes the Ray dashboard through an Ingress", "remove enableIngress"))
    return out


def service_rules(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    spec = doc.get("spec") or {}
    out: list[tuple[str, str, str, str]] = []
    if spec.get("type") in ("LoadBalancer", "NodePort"):
        for i, p in enumerate(spec.get("ports") or []):
            port = next((x for x in (p.get("targetPort"), p.get("port")) if x in CONTROL_PORTS), None)
            if port is not None:
                out.append((f"spec.ports[{i}]", "gpuserve/control-plane-exposed", f"a {spec['type']} Service exposes the Ray {CONTROL_PORTS[port]} port {port} outside the cluster", "use ClusterIP for Ray's control plane; expose only the Serve port"))
    return out


@dataclass(frozen=True)
class UpgradeFit:
    """What a RayService's upgrade strategy needs of one GPU worker group's pool.

    Attributes:
        group: The worker group (one gpuserve pool).
        strategy: ``NewCluster`` (side by side: a whole new cluster beside the old one) or
            ``NewClusterWithIncrementalUpgrade`` (the new cluster grows by at most the surge at a time).
        max_nodes: The most nodes the pool can ever have (its ``gpuserve.io/pool-max-nodes`` label).
        gpus_per_node: GPUs per node of the group.
        old_nodes: (fewest, most) nodes the old cluster's group runs (its min and max replicas).
        nodes_at_least: Nodes both clusters need during the upgrade with the old one at its fewest.
        nodes_at_most: The same with the old one at its most.
    """

    group: str
    strategy: str
    max_nodes: int
    gpus_per_node: int
    old_nodes: tuple[int, int]
    nodes_at_least: int
    nodes_at_most: int

    @property
    def fits_always(self) -> bool:
        return self.nodes_at_most <= self.max_nodes

    @property
    def fits_ever(self) -> bool:
        return self.nodes_at_least <= self.max_nodes

    def __str__(self) -> str:
        verdict = "fits" if self.fits_always else ("fits only while the old cluster is small" if self.fits_ever else "never fits")
        return (
            f"upgrade {self.strategy}: pool {self.group} needs {self.nodes_at_least}-{self.nodes_at_most} nodes "
            f"({self.nodes_at_least * self.gpus_per_node}-{self.nodes_at_most * self.gpus_per_node} GPUs), "
            f"max_nodes {self.max_nodes}: {verdict}"
        )


def upgrade_fits(doc: dict[str, Any]) -> list[tuple[int, UpgradeFit]]:
    """(group index, fit) for each GPU worker group of a RayService whose pool bound is known (the render's
    ``gpuserve.io/pool-max-nodes`` label); none for ``upgradeStrategy.type: None`` (no new cluster)."""
    spec = doc.get("spec") or {}
    us = spec.get("upgradeStrategy") or {}
    # Unset behaves like NewCluster (KubeRay's default, zero-downtime).
    strategy = us.get("type") or "NewCluster"
    if strategy not in ("NewCluster", "NewClusterWithIncrementalUpgrade"):
        return []
    surge = (us.get("clusterUpgradeOptions") or {}).get("maxSurgePercent", 100)
    out = []
    for i, g in enumerate(((spec.get("rayClusterConfig") or {}).get("workerGroupSpecs")) or []):
        if not isinstance(g, dict):
            continue
        containers = ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        gpus = sum(max(_gpu_count(c, "limits"), _gpu_count(c, "requests")) for c in containers if isinstance(c, dict))
        try:
            pool_max = int((g.get("labels") or {})[POOL_MAX_NODES_LABEL])
        except (KeyError, TypeError, ValueError):
            continue
        if not gpus:
            continue
        lo = g.get("minReplicas") if isinstance(g.get("minReplicas"), int) else 0
        hi = g.get("maxReplicas") if isinstance(g.get("maxReplicas"), int) else UNBOUNDED
        hi = max(lo, min(hi, pool_max))
        if strategy == "NewCluster":
            # The new cluster must bring its deployments' fewest replicas up before traffic moves.
            least, most = lo + lo, hi + lo
        else:
            # The new cluster grows by at most maxSurgePercent of the capacity at a time.
            extra = lambda n: math.ceil(n * (surge if isinstance(surge, int) else 100) / 100)  # noqa: E731
            least, most = lo + extra(lo), hi + extra(hi)
        out.append((i, UpgradeFit(str(g.get("groupName")), strategy, pool_max, gpus, (lo, hi), least, most)))
    return out


def _can_reach_zero(cfg: Any) -> list[str]:
    """The deployments of a parsed Serve config that may run no replica."""
    out = []
    for app in (cfg or {}).get("applications") or []:
        for d in (app or {}).get("deployments") or []:
            auto = d.get("autoscaling_config") or {}
            # Serve's own default min_replicas is 1: only an explicit 0 reaches zero.
            if auto.get("min_replicas") == 0 or d.get("num_replicas") == 0:
                out.append(f"{app.get('name')}/{d.get('name')}")
    return out


def gpuserve_rules(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """gpuserve's own rules on a RayService: (path, rule, message, fix, severity)."""
    out: list[tuple[str, str, str, str, str]] = []
    spec = doc.get("spec") or {}
    c, base = spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig"
    if (c.get("authOptions") or {}).get("mode") != "token":
        out.append((f"{base}.authOptions", "gpuserve/auth", "Ray's token auth is off: anyone who reaches the dashboard, GCS or Jobs API controls the cluster", "set authOptions: {mode: token, secretName: <Secret with auth_token>} (gpuserve render does)", "error"))
    try:
        cfg = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        cfg = {}
    cfg = cfg if isinstance(cfg, dict) else {}
    groups = [g for g in c.get("workerGroupSpecs") or [] if isinstance(g, dict)]
    keeps_node = any(isinstance(g.get("minReplicas"), int) and g["minReplicas"] >= 1 for g in groups)
    head_out = spec.get("excludeHeadPodFromServeSvc") is True
    zero = _can_reach_zero(cfg)
    if head_out and cfg.get("proxy_location") in ("HeadOnly", "Disabled"):
        out.append(("spec.excludeHeadPodFromServeSvc", "gpuserve/serve-endpoint", f"the head is excluded from the Serve service but proxy_location is {cfg['proxy_location']}: the service has no proxy behind it", "use proxy_location: EveryNode, or keep the head in the Serve service", "error"))
    elif head_out and zero and not keeps_node:
        out.append(("spec.excludeHeadPodFromServeSvc", "gpuserve/serve-endpoint", f"{', '.join(zero)} can scale to zero replicas, every worker group to zero nodes, and the head is excluded from the Serve service: with the nodes gone the service has no endpoint, so the request that should wake the deployment never arrives", "set excludeHeadPodFromServeSvc: false, or give a CPU worker group minReplicas >= 1 (gpuserve render does one of them)", "error"))
    if c.get("gcsFaultToleranceOptions"):
        on_head = [
            f"{app.get('name')}/{d.get('name')}"
            for app in cfg.get("applications") or []
            for d in (app or {}).get("deployments") or []
            if "node:__internal_head__" in ((d.get("ray_actor_options") or {}).get("resources") or {})
        ]
        if on_head:
            out.append(("spec.serveConfigV2", "gpuserve/gateway-on-head", f"GCS fault tolerance keeps the workers through a head restart, but {', '.join(on_head)} run on the head: while it restarts no request is admitted", "give a CPU pool min_nodes >= 1 so the gateways run there (gpuserve render places them on it)", "warning"))
    for i, fit in upgrade_fits(doc):
        path = f"{base}.workerGroupSpecs[{i}]"
        if not fit.fits_ever:
            out.append((path, "gpuserve/upgrade-fit", f"a {fit.strategy} upgrade of pool {fit.group} needs at least {fit.nodes_at_least} nodes ({fit.nodes_at_least * fit.gpus_per_node} GPUs), old and new cluster together, but the pool can have only {fit.max_nodes}: every upgrade stalls waiting for GPUs", "raise the pool's max_nodes, lower the deployments' min_replicas, or use the incremental upgrade (gpuserve render --gateway-class) with a smaller maxSurgePercent", "error"))
        elif not fit.fits_always:
            out.append((path, "gpuserve/upgrade-fit", f"a {fit.strategy} upgrade of pool {fit.group} needs {fit.nodes_at_least}-{fit.nodes_at_most} nodes ({fit.nodes_at_least * fit.gpus_per_node}-{fit.nodes_at_most * fit.gpus_per_node} GPUs), old and new cluster together, and the pool can have {fit.max_nodes}: with the old cluster near its {fit.old_nodes[1]} nodes the upgrade waits for GPUs until it shrinks", "upgrade at a quiet time, raise the pool's max_nodes, or lower maxSurgePercent", "warning"))
    for role, path, t in _pod_templates("RayService", doc):
        pod = t.get("spec") or {}
        for j, v in enumerate(pod.get("volumes") or []):
            if isinstance(v, dict) and "hostPath" in v:
                out.append((f"{path}.spec.volumes[{j}]", "gpuserve/host-path", f"volume {v.get('name')!r} is a hostPath: every pod on the node can write it, and Pod Security 'baseline' forbids it", "use an ephemeral volume or a PersistentVolumeClaim (gpuserve render --weight-cache)", "warning"))
        if role != "head":
            for j, ct in enumerate(pod.get("containers") or []):
                if isinstance(ct, dict) and max(_gpu_count(ct, "limits"), _gpu_count(ct, "requests")) and not ((ct.get("lifecycle") or {}).get("preStop")):
                    out.append((f"{path}.spec.containers[{j}].lifecycle", "gpuserve/drain", f"GPU worker group {role} has no preStop hook: SIGTERM stops Ray at once and the requests running there are lost", "add a preStop hook that drains the node (gpuserve drain --timeout-s N) and a terminationGracePeriodSeconds above N", "warning"))
    return out


def _selects(selector: Any, labels: dict[str, Any]) -> bool:
    """Whether a Kubernetes label selector (matchLabels and matchExpressions) matches ``labels``."""
    if not isinstance(selector, dict):
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values):
            return False
        if (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def network_policy_findings(docs: list[Any]) -> list[tuple[int, str]]:
    """(document number, label) of each RayService no NetworkPolicy in the set selects (its head pod)."""
    policies = [
        d for d in docs
        if isinstance(d, dict) and d.get("kind") == "NetworkPolicy" and "Ingress" in ((d.get("spec") or {}).get("policyTypes") or ["Ingress"])
    ]
    out = []
    for n, d in enumerate(docs, start=1):
        if not (isinstance(d, dict) and d.get("kind") == "RayService"):
            continue
        ns = (d.get("metadata") or {}).get("namespace")
        head = ((((d.get("spec") or {}).get("rayClusterConfig") or {}).get("headGroupSpec") or {}).get("template") or {})
        labels = {**KUBERAY_POD_LABELS, **((head.get("metadata") or {}).get("labels") or {})}
        if not any(
            (p.get("metadata") or {}).get("namespace") == ns and _selects((p.get("spec") or {}).get("podSelector"), labels)
            for p in policies
        ):
            out.append((n, f"RayService/{(d.get('metadata') or {}).get('name', '?')} (document {n})"))
    return out


# -- the driver ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _k8s_validator(kind: str, api_version: str, version: str) -> Any:
    """A strict JSON-schema validator for one Kubernetes kind, from kubernetes-validate's bundled schemas.

    Built once per kind (the package's own ``validate`` re-reads its large definitions file per call).
    Returns None when Kubernetes has no such kind (a CRD's object).
    """
    import json
    from importlib import resources

    import jsonschema
    from kubernetes_validate.utils import all_versions, major_minor
    from referencing import Registry, Resource

    chosen = [v for v in all_versions() if major_minor(v) <= major_minor(version)][-1]
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{chosen}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    target = folder / f"{kind.lower()}-{group}.json"
    if not target.is_file():
        return None
    schema = json.loads(target.read_text())
    defs = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _k8s(doc: dict[str, Any], version: str) -> Optional[tuple[str, str]]:
    """The first schema error of a Kubernetes object as (path, message), or None."""
    validator = _k8s_validator(str(doc.get("kind")), str(doc.get("apiVersion")), version)
    if validator is None:
        return None
    err = next(iter(sorted(validator.iter_errors(doc), key=lambda e: list(e.path))), None)
    if err is None:
        return None
    path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err.path).lstrip(".")
    return path, err.message


def validate_documents(docs: list[Any], crd_dir: str | Path, k8s_version: str = "1.31") -> list[Finding]:
    """Every finding in ``docs`` (parsed YAML documents), in document order."""
    schemas = load_crd_schemas(crd_dir)
    findings: list[Finding] = []
    for n, raw in enumerate(docs, start=1):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            findings.append(Finding(f"document {n}", "", "yaml", "is not a mapping", "each document must be a Kubernetes object"))
            continue
        kind, api = raw.get("kind", "?"), raw.get("apiVersion", "?")
        label = f"{kind}/{(raw.get('metadata') or {}).get('name', '?')} (document {n})"
        doc = copy.deepcopy(raw)

        def add(path: str, rule: str, msg: str, fix: str) -> None:
            findings.append(Finding(label, path, rule, msg, fix))

        if api.startswith("ray.io/"):
            schema = schemas.get((api, kind))
            if schema is None:
                add("apiVersion", "schema", f"no CRD for {api} {kind} in {crd_dir}", "use apiVersion ray.io/v1, or point --crd-dir at CRDs that define it")
                continue
            s = _Schema()
            s.check(schema, doc, "")
            for path, msg, fix in s.errors:
                add(path, "schema", msg, fix)
            rules = rayservice_rules(doc) if kind == "RayService" else raycluster_rules(doc) if kind == "RayCluster" else []
            for path, rule, msg, fix in rules + pod_rules(kind, doc):
                add(path, rule, msg, fix)
            if kind == "RayService":
                for path, rule, msg, fix, severity in gpuserve_rules(doc):
                    findings.append(Finding(label, path, rule, msg, fix, severity))
            for role, path, template in _pod_templates(kind, doc):
                bad = _k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}, k8s_version)
                if bad:
                    add(f"{path}.{bad[0].removeprefix('template.')}".rstrip("."), "k8s/schema", bad[1], "fix the pod template to Kubernetes' schema")
        elif api.startswith("monitoring.coreos.com/"):
            # The Prometheus operator's CRDs are the user's; check the shape gpuserve relies on.
            if not isinstance(doc.get("spec"), dict):
                add("spec", "schema", "spec is missing", "add a spec")
        else:
            bad = _k8s(doc, k8s_version)
            if bad:
                add(bad[0], "k8s/schema", bad[1], f"fix the {kind} to Kubernetes' schema")
            if kind == "Service":
                for path, rule, msg, fix in service_rules(doc):
                    add(path, rule, msg, fix)
    for n, label in network_policy_findings(docs):
        findings.append(Finding(label, "metadata", "gpuserve/network-policy", "no NetworkPolicy in this manifest set selects the RayService's pods: every port (GCS, dashboard, Jobs API) is open to every pod in the cluster", "apply the NetworkPolicy gpuserve render writes, or one of your own that selects these pods", "warning"))
    return findings


def validate_file(path: str | Path, crd_dir: str | Path, k8s_version: str = "1.31") -> list[Finding]:
    """Validate every document of a YAML file."""
    with open(path) as f:
        docs = list(yaml.safe_load_all(f))
    return validate_documents(docs, crd_dir, k8s_version)
