"""Render a ServingSpec into the Kubernetes documents that run it under KubeRay.

Pure: plain dicts in, plain dicts out; no Kubernetes client, no Ray. The same ServingSpec drives Ray
placement locally (``serving.pools``) and the worker groups here, so the two cannot drift: a GPU pool's
worker group carries exactly the Ray labels replicas select (``gpuserve.io/pool``), tolerates the pool's
taints (``nvidia.com/gpu`` always), asks for whole GPUs with limits equal to requests (KubeRay tells Ray
the GPU count from the limit), and scales between bounds derived from the deployments placed on it.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from serving.pools import GPU_TAINT_KEY, NodePool, ServingSpec
from serving.protocol import PROXY_ENV
from serving.spec import ModelDeployment

SERVICE_LABEL = "gpuserve.io/service"
ROLE_LABEL = "gpuserve.io/role"
WEIGHTS_VOLUME = "gpuserve-weights"
METRICS_PORT = 8080
SERVE_PORT = 8000
# Ports that must never leave the cluster: GCS, dashboard (job and Serve REST API), Ray client.
CONTROL_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}


@dataclass(frozen=True)
class RenderOptions:
    """Cluster-side choices that are not part of the ServingSpec.

    Attributes:
        import_path: ``module:attr`` of the ServingSpec, importable inside the image.
        image: Container image with gpuserve, its dependencies and the user's code.
        namespace: Namespace of every document (None: the one ``kubectl apply`` uses).
        ray_version: Ray version in the image (token auth needs >= 2.52).
        auth_secret: Secret holding Ray's cluster token (key ``auth_token``), created by the user.
        api_key_secret: Secret with the data-plane API keys (key ``api-keys``) for deployments with ``auth``.
        operator_namespace: Namespace of the KubeRay operator, which must reach the dashboard.
        monitoring_namespace: Namespace of Prometheus, which scrapes the metrics port.
        head_cpus: CPU cores for the head pod (it runs no user work).
        head_memory_bytes: Memory for the head pod.
        termination_grace_period_s: Time a worker pod gets to drain its requests when removed.
        rule_labels: Labels the Prometheus operator selects PrometheusRules and PodMonitors by.
    """

    import_path: str
    image: str = "gpuserve:0.1.0"
    namespace: Optional[str] = None
    ray_version: str = "2.60.0"
    auth_secret: str = "ray-auth-token"
    api_key_secret: str = "gpuserve-api-keys"
    operator_namespace: str = "kuberay-system"
    monitoring_namespace: str = "monitoring"
    head_cpus: float = 2.0
    head_memory_bytes: int = 8 << 30
    termination_grace_period_s: int = 90
    rule_labels: dict[str, str] = field(default_factory=lambda: {"release": "prometheus"})


def _quantity_cpu(cores: float) -> str:
    return str(int(cores)) if float(cores).is_integer() else f"{int(round(cores * 1000))}m"


def _quantity_bytes(n: int) -> str:
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _meta(name: str, service: str, opts: RenderOptions, labels: Optional[dict[str, str]] = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = {SERVICE_LABEL: service, **(labels or {})}
    return meta


def _security_context() -> dict[str, Any]:
    # Ray writes its session directory and object spilling under /tmp, so the root stays writable;
    # everything else that can be taken away is.
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100, "seccompProfile": {"type": "RuntimeDefault"}}


def _tolerations(pool: NodePool) -> list[dict[str, Any]]:
    out = []
    for t in pool.taints:
        tol: dict[str, Any] = {"key": t.key, "effect": t.effect}
        if t.value is None:
            tol["operator"] = "Exists"
        else:
            tol.update(operator="Equal", value=t.value)
        out.append(tol)
    return out


def _deployments_on(spec: ServingSpec, pool: NodePool) -> list[ModelDeployment]:
    return [d for d in spec.deployments if d.resources.node_pool == pool.name]


def worker_bounds(spec: ServingSpec, pool: NodePool) -> tuple[int, int]:
    """(min, max) nodes of a pool's worker group: what its deployments' replica bounds need, within the pool's."""
    deps = _deployments_on(spec, pool)
    if pool.is_gpu:
        per_node = pool.gpus_per_node
        lo = math.ceil(sum(d.replica_bounds()[0] * d.resources.gpus for d in deps) / per_node)
        hi = math.ceil(sum(d.replica_bounds()[1] * d.resources.gpus for d in deps) / per_node)
    else:
        per_node = pool.cpus_per_node
        lo = math.ceil(sum(d.replica_bounds()[0] * d.resources.cpus for d in deps) / per_node)
        hi = max(1, math.ceil(sum(d.replica_bounds()[1] * d.resources.cpus for d in deps) / per_node))
    lo = max(lo, pool.min_nodes)
    hi = min(max(hi, lo), pool.max_nodes)
    return min(lo, hi), hi


def _prefetch(spec: ServingSpec, pool: NodePool, opts: RenderOptions) -> tuple[list[dict], list[dict], list[dict]]:
    """Init containers, volumes and mounts that fill the node's weight cache before Ray starts."""
    cached = [d for d in _deployments_on(spec, pool) if d.model.cache_dir]
    if not cached:
        return [], [], []
    dirs = sorted({d.model.cache_dir for d in cached})
    volumes, mounts = [], []
    for i, path in enumerate(dirs):
        name = WEIGHTS_VOLUME if i == 0 else f"{WEIGHTS_VOLUME}-{i}"
        # A node-level cache: a replica restarted on the same node finds its weights verified and local.
        volumes.append({"name": name, "hostPath": {"path": "/var/lib/gpuserve/weights", "type": "DirectoryOrCreate"}})
        mounts.append({"name": name, "mountPath": path})
    inits = []
    for d in cached:
        inits.append(
            {
                "name": f"prefetch-{d.name}",
                "image": opts.image,
                "command": ["gpuserve", "prefetch", d.model.path, "--cache-dir", d.model.cache_dir],
                "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
                "securityContext": {**_security_context(), "readOnlyRootFilesystem": True},
                "volumeMounts": list(mounts),
            }
        )
    return inits, volumes, mounts


def _api_key_wiring(deps: list[ModelDeployment], opts: RenderOptions) -> tuple[list[dict], list[dict], list[dict]]:
    """Env vars, volumes and mounts that hand the data-plane API key Secret to replicas that need it."""
    env, volumes, mounts = [], [], []
    for d in deps:
        a = d.auth
        if a is None:
            continue
        if a.api_keys_env:
            env.append(
                {"name": a.api_keys_env, "valueFrom": {"secretKeyRef": {"name": opts.api_key_secret, "key": "api-keys"}}}
            )
        if a.api_keys_file:
            folder, base = posixpath.split(a.api_keys_file)
            name = f"api-keys-{len(volumes)}"
            volumes.append(
                {"name": name, "secret": {"secretName": opts.api_key_secret, "items": [{"key": "api-keys", "path": base}]}}
            )
            mounts.append({"name": name, "mountPath": folder, "readOnly": True})
    return env, volumes, mounts


def _container(name: str, opts: RenderOptions, cpus: float, memory: int, gpus: int, mounts: list[dict], env: list[dict]) -> dict:
    res: dict[str, Any] = {"cpu": _quantity_cpu(cpus), "memory": _quantity_bytes(memory)}
    if gpus:
        res[GPU_TAINT_KEY] = str(gpus)
    return {
        "name": name,
        "image": opts.image,
        # Extended resources (GPUs) must have requests equal to limits; CPU and memory too, so the pod
        # is Guaranteed and never evicted for memory pressure mid-inference.
        "resources": {"requests": dict(res), "limits": dict(res)},
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}, {"name": "serve", "containerPort": SERVE_PORT}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}, *({"name": k, "value": v} for k, v in PROXY_ENV.items()), *env],
        "securityContext": _security_context(),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts],
    }


def _checking_keys_on(spec: ServingSpec, pool: Optional[NodePool]) -> list[ModelDeployment]:
    """The deployments whose API keys are checked on ``pool``'s nodes (None: the head): their replicas'
    pool, and the gateways' (:meth:`ServingSpec.gateway_pool`, else the head). Nowhere else gets the Secret."""
    gw = spec.gateway_pool()
    here = [] if pool is None else _deployments_on(spec, pool)
    gateways_here = (gw is None and pool is None) or (gw is not None and pool is not None and gw.name == pool.name)
    return here + [d for d in spec.deployments if gateways_here and d.queue.gateway and d not in here]


def _worker_group(spec: ServingSpec, pool: NodePool, opts: RenderOptions) -> dict[str, Any]:
    inits, w_volumes, w_mounts = _prefetch(spec, pool, opts)
    env, k_volumes, k_mounts = _api_key_wiring(_checking_keys_on(spec, pool), opts)
    lo, hi = worker_bounds(spec, pool)
    pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": opts.termination_grace_period_s,
        "containers": [
            _container("ray-worker", opts, pool.cpus_per_node, pool.memory_bytes_per_node, pool.gpus_per_node, w_mounts + k_mounts, env)
        ],
        "volumes": [
            # Ray's object store lives in shared memory: 30 % of the node's memory, as Ray sizes it.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity_bytes(int(pool.memory_bytes_per_node * 0.3) >> 20 << 20)}},
            *w_volumes,
            *k_volumes,
        ],
    }
    if inits:
        pod["initContainers"] = inits
    if pool.node_labels:
        pod["nodeSelector"] = dict(pool.node_labels)
    tolerations = _tolerations(pool)
    if tolerations:
        pod["tolerations"] = tolerations
    return {
        "groupName": pool.name,
        "replicas": lo,
        "minReplicas": lo,
        "maxReplicas": hi,
        # Ray node labels: exactly what replicas select (serving.pools), so placement agrees with KubeRay.
        "labels": dict(pool.ray_labels),
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": {"metadata": {"labels": {SERVICE_LABEL: spec.name, ROLE_LABEL: f"worker-{pool.name}"}}, "spec": pod},
    }


def serve_config(spec: ServingSpec, opts: RenderOptions) -> dict[str, Any]:
    """Ray Serve's config (``serveConfigV2``): one application per deployment, built by gpuserve's builder."""
    from serving._private.options import deployment_options, gateway_options

    apps = []
    for d in spec.deployments:
        o = deployment_options(d, spec.pool_of(d))
        actor = {k: v for k, v in o["ray_actor_options"].items() if k != "runtime_env"}
        dep: dict[str, Any] = {
            "name": d.name,
            "max_ongoing_requests": o["max_ongoing_requests"],
            "max_queued_requests": o["max_queued_requests"],
            "ray_actor_options": actor,
        }
        if "autoscaling_config" in o:
            dep["autoscaling_config"] = o["autoscaling_config"]
        else:
            dep["num_replicas"] = o["num_replicas"]
        deps = [dep]
        if d.queue.gateway:
            g = gateway_options(d, spec.gateway_pool())
            deps.append({k: g[k] for k in ("name", "num_replicas", "max_ongoing_requests", "max_queued_requests", "backpressure_config", "ray_actor_options")})
        apps.append(
            {
                "name": d.name,
                "route_prefix": f"/{d.name}",
                "import_path": "serving.builder:build",
                "args": {"spec": opts.import_path, "deployment": d.name},
                "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
                "deployments": deps,
            }
        )
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": SERVE_PORT}, "applications": apps}


def _idle_timeout_s(spec: ServingSpec) -> int:
    # Nodes must outlive the scale-down delay of the deployments on them, or the autoscaler would
    # remove a node the policy is still deciding about.
    delays = [d.autoscaling.downscale_delay_s for d in spec.deployments if d.autoscaling is not None]
    return int(max([60.0, *delays]))


def render(spec: ServingSpec, opts: RenderOptions) -> list[dict[str, Any]]:
    """The documents, in apply order: RayService, NetworkPolicy, PodMonitor, PrometheusRule."""
    from serving.monitoring import ALERTS, asset_path

    # Without a CPU pool that keeps a node, the admission gateways run on the head (no CPUs reserved,
    # I/O only) and check the API keys there.
    h_env, h_volumes, h_mounts = _api_key_wiring(_checking_keys_on(spec, None), opts)
    head_pod = {
        "securityContext": _pod_security(),
        "containers": [
            {
                **_container("ray-head", opts, opts.head_cpus, opts.head_memory_bytes, 0, h_mounts, h_env),
                "ports": [
                    {"name": "gcs", "containerPort": CONTROL_PORTS["gcs"]},
                    {"name": "dashboard", "containerPort": CONTROL_PORTS["dashboard"]},
                    {"name": "client", "containerPort": CONTROL_PORTS["client"]},
                    {"name": "serve", "containerPort": SERVE_PORT},
                    {"name": "metrics", "containerPort": METRICS_PORT},
                ],
            }
        ],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}, *h_volumes],
    }
    ray_service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(spec.name, spec.name, opts),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(spec, opts), sort_keys=False),
            # Traffic enters at the workers' proxies; the head runs the control plane and the gateways.
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": {
                "rayVersion": opts.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "version": "v2",
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": _idle_timeout_s(spec),
                },
                "authOptions": {"mode": "token", "secretName": opts.auth_secret},
                "headGroupSpec": {
                    "serviceType": "ClusterIP",
                    # No model work on the head: no CPUs for tasks or replicas, no GPUs (the gateways
                    # reserve none).
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
                    "template": {"metadata": {"labels": {SERVICE_LABEL: spec.name, ROLE_LABEL: "head"}}, "spec": head_pod},
                },
                "workerGroupSpecs": [_worker_group(spec, p, opts) for p in spec.pools],
            },
        },
    }
    pods = {"matchLabels": {SERVICE_LABEL: spec.name}}
    network_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(f"{spec.name}-ray", spec.name, opts),
        "spec": {
            "podSelector": pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                # Ray's own pods talk to each other on any port (GCS, raylets, object transfer, workers).
                {"from": [{"podSelector": pods}]},
                # The operator drives the dashboard's Serve API; Prometheus scrapes the metrics port.
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": opts.operator_namespace}}}],
                    "ports": [{"protocol": "TCP", "port": CONTROL_PORTS["dashboard"]}],
                },
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": opts.monitoring_namespace}}}],
                    "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
                },
                # Inference traffic from anywhere the cluster routes it (Ingress, Gateway, other pods).
                {"ports": [{"protocol": "TCP", "port": SERVE_PORT}]},
            ],
        },
    }
    pod_monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(f"{spec.name}-ray", spec.name, opts, opts.rule_labels),
        "spec": {"selector": pods, "podMetricsEndpoints": [{"port": "metrics", "interval": "15s"}]},
    }
    rules = yaml.safe_load(asset_path(ALERTS).read_text())
    prometheus_rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta(f"{spec.name}-gpuserve", spec.name, opts, opts.rule_labels),
        "spec": {"groups": rules["groups"]},
    }
    return [ray_service, network_policy, pod_monitor, prometheus_rule]


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # Multi-line strings (serveConfigV2) as literal blocks: readable in review, identical when parsed.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML, stable across runs (golden files compare it byte for byte)."""
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)


__all__ = ["RenderOptions", "render", "serve_config", "to_yaml", "worker_bounds"]
