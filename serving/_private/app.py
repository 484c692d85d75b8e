"""Build a Ray Serve Application from a ModelDeployment (the Ray adapter)."""

from __future__ import annotations

from typing import Any

from serving._private.options import deployment_options, gateway_options
from serving.spec import ModelDeployment


def build_application(spec: ModelDeployment, pool: Any = None, gateway_pool: Any = None) -> Any:
    """Return a bound ``ray.serve.Application`` serving ``spec`` (pinned to ``pool`` if given).

    With ``queue.gateway`` (the default) the application's ingress is the admission
    gateway (on ``gateway_pool``, else the head) and the model deployment is reached only through it.
    """
    from ray import serve

    from serving._private.server import HttpModelServer, ModelServer

    init = replica_init_spec(spec)
    if not spec.queue.gateway:
        return serve.deployment(HttpModelServer).options(**deployment_options(spec, pool)).bind(init)
    from serving._private.gateway import HttpGateway

    model = serve.deployment(ModelServer).options(**deployment_options(spec, pool)).bind(init)
    return serve.deployment(HttpGateway).options(**gateway_options(spec, gateway_pool)).bind(init, model)


# Scaling fields change how many replicas run, not what a replica does: keep
# them out of the constructor argument, so a change of replica count in a Serve
# config is a lightweight update rather than a new replica version.
_SCALING_FIELDS = frozenset({"replicas", "autoscaling"})


def replica_init_spec(spec: ModelDeployment) -> dict[str, Any]:
    """The spec as each replica receives it: everything but the scaling fields."""
    return spec.model_dump(mode="json", exclude=set(_SCALING_FIELDS))
