"""Build a Ray Serve Application from a ModelDeployment (the Ray adapter)."""

from __future__ import annotations

from typing import Any

from serving._private.options import deployment_options
from serving.spec import ModelDeployment


def build_application(spec: ModelDeployment) -> Any:
    """Return a bound ``ray.serve.Application`` serving ``spec``."""
    from ray import serve

    from serving._private.server import ModelServer

    deployment = serve.deployment(ModelServer).options(**deployment_options(spec))
    return deployment.bind(spec.model_dump(mode="json"))
