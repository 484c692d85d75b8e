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

from kuberay.validate import KUBERAY_CREATED_BY
from serving.pools import GPU_TAINT_KEY, NodePool, ServingSpec
from serving.protocol import PROXY_ENV, WEIGHT_DIGEST_DIR_ENV
from serving.spec import ModelDeployment

SERVICE_LABEL = "gpuserve.io/service"
ROLE_LABEL = "gpuserve.io/role"
WEIGHTS_VOLUME = "gpuserve-weights"
DIGESTS_VOLUME = "gpuserve-weight-digests"
DIGESTS_PATH = "/var/run/gpuserve/weight-digests"
METRICS_PORT = 8080
SERVE_PORT = 8000
# Ports that must never leave the cluster: GCS, dashboard (job and Serve REST API), Ray client.
CONTROL_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}


WEIGHT_CACHE_FORMS = ("ephemeral", "pvc:NAME", "hostPath:/PATH")
# What a pod keeps of its grace period after the drain: Ray's own stop and the process exits.
DRAIN_MARGIN_S = 30
# KubeRay's operator pods (its Helm chart's label); only they reach the dashboard from outside.
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}


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
        head_termination_grace_period_s: Time the head pod gets to stop when removed.
        rule_labels: Labels the Prometheus operator selects PrometheusRules and PodMonitors by.
        gcs_ft_redis: ``HOST:PORT`` of a Redis that keeps the GCS state (GCS fault tolerance), or None.
        gcs_ft_redis_secret: Secret with that Redis's password (key ``password``), or None for none.
        gateway_class: Gateway API class for KubeRay's incremental upgrade; None: side-by-side upgrades.
        upgrade_max_surge_percent: Incremental upgrade: most extra capacity, in percent, during the upgrade.
        upgrade_step_size_percent: Incremental upgrade: traffic moved to the new cluster per step, in percent.
        upgrade_interval_s: Incremental upgrade: seconds between steps.
        weight_cache: Volume of the weight cache: ``ephemeral`` (a volume per pod, the default),
            ``pvc:NAME`` (an existing claim) or ``hostPath:/PATH`` (only when asked for: Pod Security
            "baseline" forbids it, and every pod on the node shares it).
        weight_cache_size_bytes: Size of the ephemeral weight-cache volume.
        weight_cache_storage_class: Storage class of the ephemeral volume (None: the cluster's default).
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
    head_termination_grace_period_s: int = 60
    rule_labels: dict[str, str] = field(default_factory=lambda: {"release": "prometheus"})
    gcs_ft_redis: Optional[str] = None
    gcs_ft_redis_secret: Optional[str] = None
    gateway_class: Optional[str] = None
    upgrade_max_surge_percent: int = 25
    upgrade_step_size_percent: int = 25
    upgrade_interval_s: int = 60
    weight_cache: str = "ephemeral"
    weight_cache_size_bytes: int = 100 << 30
    weight_cache_storage_class: Optional[str] = None

    def __post_init__(self) -> None:
        if self.gcs_ft_redis is not None:
            host, _, port = self.gcs_ft_redis.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"gcs_ft_redis {self.gcs_ft_redis!r}: expected HOST:PORT with a port 1-65535; "
                    "e.g. redis.ray-system.svc.cluster.local:6379"
                )
        elif self.gcs_ft_redis_secret is not None:
            raise ValueError("gcs_ft_redis_secret is set but gcs_ft_redis is not; give the Redis address too")
        for name in ("upgrade_max_surge_percent", "upgrade_step_size_percent"):
            v = getattr(self, name)
            if not 0 < v <= 100:
                raise ValueError(f"{name} {v}: must be 1-100 (percent)")
        if self.upgrade_step_size_percent > self.upgrade_max_surge_percent:
            raise ValueError(
                f"upgrade_step_size_percent {self.upgrade_step_size_percent} exceeds upgrade_max_surge_percent "
                f"{self.upgrade_max_surge_percent}; KubeRay moves at most the surge per step: lower the step"
            )
        if self.upgrade_interval_s <= 0:
            raise ValueError(f"upgrade_interval_s {self.upgrade_interval_s}: must be > 0")
        kind, _, arg = self.weight_cache.partition(":")
        if not (kind == "ephemeral" and not arg) and not (kind in ("pvc", "hostPath") and arg):
            raise ValueError(f"weight_cache {self.weight_cache!r}: use one of {', '.join(WEIGHT_CACHE_FORMS)}")
        if kind == "hostPath" and not arg.startswith("/"):
            raise ValueError(f"weight_cache {self.weight_cache!r}: a hostPath must be absolute, e.g. hostPath:/var/lib/gpuserve")


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


def _weight_cache_volume(name: str, opts: RenderOptions) -> dict[str, Any]:
    kind, _, arg = opts.weight_cache.partition(":")
    if kind == "pvc":
        return {"name": name, "persistentVolumeClaim": {"claimName": arg}}
    if kind == "hostPath":
        # Asked for explicitly: a node-level cache every pod on the node shares.
        return {"name": name, "hostPath": {"path": arg, "type": "DirectoryOrCreate"}}
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": _quantity_bytes(opts.weight_cache_size_bytes)}},
    }
    if opts.weight_cache_storage_class:
        claim["storageClassName"] = opts.weight_cache_storage_class
    # A volume of the pod's own, created and deleted with it: nothing else can write it.
    return {"name": name, "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}


def _prefetch(spec: ServingSpec, pool: NodePool, opts: RenderOptions) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """Init containers, volumes, the Ray container's mounts and env that fill the weight cache before Ray
    starts. The init containers write the cache and the digests; the Ray container (which runs model code)
    mounts both read-only, and refuses an entry whose manifest does not match its recorded digest."""
    cached = [d for d in _deployments_on(spec, pool) if d.model.cache_dir]
    if not cached:
        return [], [], [], []
    dirs = sorted({d.model.cache_dir for d in cached})
    volumes, init_mounts, mounts = [], [], []
    for i, path in enumerate(dirs):
        name = WEIGHTS_VOLUME if i == 0 else f"{WEIGHTS_VOLUME}-{i}"
        volumes.append(_weight_cache_volume(name, opts))
        init_mounts.append({"name": name, "mountPath": path})
        mounts.append({"name": name, "mountPath": path, "readOnly": True})
    volumes.append({"name": DIGESTS_VOLUME, "emptyDir": {"sizeLimit": "1Mi"}})
    init_mounts.append({"name": DIGESTS_VOLUME, "mountPath": DIGESTS_PATH})
    mounts.append({"name": DIGESTS_VOLUME, "mountPath": DIGESTS_PATH, "readOnly": True})
    inits = []
    for d in cached:
        inits.append(
            {
                "name": f"prefetch-{d.name}",
                "image": opts.image,
                "command": ["gpuserve", "prefetch", d.model.path, "--cache-dir", d.model.cache_dir, "--digest-dir", DIGESTS_PATH],
                "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
                "securityContext": {**_security_context(), "readOnlyRootFilesystem": True},
                "volumeMounts": list(init_mounts),
            }
        )
    return inits, volumes, mounts, [{"name": WEIGHT_DIGEST_DIR_ENV, "value": DIGESTS_PATH}]


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


def drain_timeout_s(spec: ServingSpec, pool: NodePool) -> int:
    """How long a pool's node drains before its pod stops: the longest ``queue.drain_timeout_s`` of the
    replicas and gateways it can hold (a replica being moved finishes its requests for that long)."""
    gw = spec.gateway_pool()
    here = _deployments_on(spec, pool) + [
        d for d in spec.deployments if d.queue.gateway and gw is not None and gw.name == pool.name
    ]
    return math.ceil(max([60.0, *(d.queue.drain_timeout_s for d in here)]))


def _worker_group(spec: ServingSpec, pool: NodePool, opts: RenderOptions) -> dict[str, Any]:
    inits, w_volumes, w_mounts, w_env = _prefetch(spec, pool, opts)
    env, k_volumes, k_mounts = _api_key_wiring(_checking_keys_on(spec, pool), opts)
    lo, hi = worker_bounds(spec, pool)
    drain_s = drain_timeout_s(spec, pool)
    worker = _container("ray-worker", opts, pool.cpus_per_node, pool.memory_bytes_per_node, pool.gpus_per_node, w_mounts + k_mounts, w_env + env)
    # Before SIGTERM stops Ray: drain the node (Serve starts replacements elsewhere, then stops these
    # replicas gracefully) and wait for its replicas to leave, within the grace period.
    worker["lifecycle"] = {"preStop": {"exec": {"command": ["gpuserve", "drain", "--timeout-s", str(drain_s)]}}}
    pod: dict[str, Any] = {
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": drain_s + DRAIN_MARGIN_S,
        "containers": [worker],
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


def keeps_a_node(spec: ServingSpec) -> bool:
    """Whether some worker group always has a node, whose Serve proxy can receive requests."""
    return any(worker_bounds(spec, p)[0] >= 1 for p in spec.pools)


def _upgrade_strategy(opts: RenderOptions) -> dict[str, Any]:
    if opts.gateway_class is None:
        # A whole new cluster beside the old one; `gpuserve validate` says whether the pools hold both.
        return {"type": "NewCluster"}
    return {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {
            "gatewayClassName": opts.gateway_class,
            "maxSurgePercent": opts.upgrade_max_surge_percent,
            "stepSizePercent": opts.upgrade_step_size_percent,
            "intervalSeconds": opts.upgrade_interval_s,
        },
    }


def _gcs_fault_tolerance(opts: RenderOptions) -> Optional[dict[str, Any]]:
    if opts.gcs_ft_redis is None:
        return None
    ft: dict[str, Any] = {"redisAddress": opts.gcs_ft_redis}
    if opts.gcs_ft_redis_secret:
        ft["redisPassword"] = {"valueFrom": {"secretKeyRef": {"name": opts.gcs_ft_redis_secret, "key": "password"}}}
    return ft


def _pod_disruption_budgets(spec: ServingSpec, opts: RenderOptions) -> list[dict[str, Any]]:
    """One for the head and one per GPU group: voluntary evictions (node drains, upgrades of the node pool)
    take one pod at a time, and the head only where losing it is survivable."""

    def pdb(name: str, role: str, max_unavailable: int) -> dict[str, Any]:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(name, spec.name, opts),
            "spec": {
                "maxUnavailable": max_unavailable,
                "selector": {"matchLabels": {SERVICE_LABEL: spec.name, ROLE_LABEL: role}},
                # A pod that is not ready serves nothing: never let it block a drain.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }

    # Without GCS fault tolerance an evicted head is a full outage (every replica reloads): no voluntary
    # eviction; with it, the workers keep serving while the head restarts.
    out = [pdb(f"{spec.name}-head", "head", 1 if opts.gcs_ft_redis else 0)]
    out += [pdb(f"{spec.name}-{p.name}", f"worker-{p.name}", 1) for p in spec.pools if p.is_gpu]
    return out


def _network_policies(spec: ServingSpec, opts: RenderOptions) -> list[dict[str, Any]]:
    """Ray's pods talk to each other on any port; from outside, the Serve port is open to anyone, the
    dashboard (Serve and Jobs API) to the KubeRay operator's pods only, metrics to Prometheus; GCS and every
    other Ray port to nobody. Egress: each other, DNS, and for the head the API server (its autoscaler)
    and the GCS fault-tolerance Redis."""
    # Every pod KubeRay creates carries KUBERAY_CREATED_BY; with the service label it selects this RayService's pods.
    ray_pods = {"matchLabels": {SERVICE_LABEL: spec.name, **KUBERAY_CREATED_BY}}
    head = {"matchLabels": {SERVICE_LABEL: spec.name, ROLE_LABEL: "head", **KUBERAY_CREATED_BY}}

    def namespace(name: str) -> dict[str, Any]:
        return {"matchLabels": {"kubernetes.io/metadata.name": name}}

    def tcp(*ports: int) -> list[dict[str, Any]]:
        return [{"protocol": "TCP", "port": p} for p in ports]

    pods = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(f"{spec.name}-ray", spec.name, opts),
        "spec": {
            "podSelector": ray_pods,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": ray_pods}]},
                {
                    "from": [{"namespaceSelector": namespace(opts.operator_namespace), "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}}],
                    "ports": tcp(CONTROL_PORTS["dashboard"]),
                },
                {"from": [{"namespaceSelector": namespace(opts.monitoring_namespace)}], "ports": tcp(METRICS_PORT)},
                # Inference traffic from anywhere the cluster routes it (Ingress, Gateway, other pods).
                {"ports": tcp(SERVE_PORT)},
            ],
            "egress": [
                {"to": [{"podSelector": ray_pods}]},
                {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            ],
        },
    }
    head_egress: list[dict[str, Any]] = [{"ports": tcp(443, 6443)}]
    if opts.gcs_ft_redis:
        head_egress.append({"ports": tcp(int(opts.gcs_ft_redis.rpartition(":")[2]))})
    head_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(f"{spec.name}-ray-head", spec.name, opts),
        "spec": {"podSelector": head, "policyTypes": ["Egress"], "egress": head_egress},
    }
    return [pods, head_policy]


def render(spec: ServingSpec, opts: RenderOptions) -> list[dict[str, Any]]:
    """The documents, in apply order: RayService, NetworkPolicies, PodDisruptionBudgets, PodMonitor,
    PrometheusRule."""
    from serving.monitoring import ALERTS, asset_path

    # Without a CPU pool that keeps a node, the admission gateways run on the head (no CPUs reserved,
    # I/O only) and check the API keys there.
    h_env, h_volumes, h_mounts = _api_key_wiring(_checking_keys_on(spec, None), opts)
    head_pod = {
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": opts.head_termination_grace_period_s,
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
    cluster: dict[str, Any] = {
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
    }
    ft = _gcs_fault_tolerance(opts)
    if ft is not None:
        cluster["gcsFaultToleranceOptions"] = ft
    ray_service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(spec.name, spec.name, opts),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(spec, opts), sort_keys=False),
            "upgradeStrategy": _upgrade_strategy(opts),
            # Traffic enters at the workers' proxies while some group keeps a node. When every group can
            # reach zero nodes (a deployment scaling from zero), the head's proxy stays in the Serve
            # service: otherwise it has no endpoints, and the request that should wake the deployment
            # never arrives.
            "excludeHeadPodFromServeSvc": keeps_a_node(spec),
            "rayClusterConfig": cluster,
        },
    }
    pods = {"matchLabels": {SERVICE_LABEL: spec.name}}
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
    return [ray_service, *_network_policies(spec, opts), *_pod_disruption_budgets(spec, opts), pod_monitor, prometheus_rule]


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


__all__ = ["RenderOptions", "drain_timeout_s", "keeps_a_node", "render", "serve_config", "to_yaml", "worker_bounds"]
