"""The rendered Serve config is what Ray accepts, and its builder builds what the config describes.
(The multi-node tier serves a configured application through the builder on pool-labelled nodes.)"""

import yaml

from kuberay import RenderOptions, render
from serving.builder import build, load_spec


def test_rendered_serve_config_passes_rays_own_schema():
    from ray.serve.schema import ServeDeploySchema

    for target in ("examples.two_pools:serving", "examples.quickstart:spec"):
        docs = render(load_spec(target), RenderOptions(import_path=target))
        config = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
        schema = ServeDeploySchema.model_validate(config)
        assert [a.import_path for a in schema.applications] == ["serving.builder:build"] * len(schema.applications)


def test_the_builder_builds_each_configured_deployment_with_the_configured_options():
    target = "examples.two_pools:serving"
    docs = render(load_spec(target), RenderOptions(import_path=target))
    for app_cfg in yaml.safe_load(docs[0]["spec"]["serveConfigV2"])["applications"]:
        app = build(app_cfg["args"])
        want, want_gateway = app_cfg["deployments"]
        # The admission gateway is the ingress; the model deployment is bound into it.
        gateway = app._bound_deployment
        assert gateway.name == want_gateway["name"] == f"{want['name']}-gateway"
        # Two gateways by default (queue.gateway_replicas), each with its share of the bound.
        assert gateway.num_replicas == want_gateway["num_replicas"] == 2
        assert gateway.ray_actor_options == want_gateway["ray_actor_options"]
        assert gateway.max_queued_requests == want_gateway["max_queued_requests"]
        got = gateway.init_args[1]._bound_deployment
        assert got.name == want["name"]
        assert got.ray_actor_options["label_selector"] == want["ray_actor_options"]["label_selector"]
        assert got.max_ongoing_requests == want["max_ongoing_requests"]
