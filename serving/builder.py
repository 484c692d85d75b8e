"""Ray Serve application builder for Serve config files (``serveConfigV2`` on KubeRay).

A config names ``import_path: serving.builder:build`` and passes ``args``: ``spec``, the import path of a
ServingSpec (or a ModelDeployment), and ``deployment``, the name of the deployment this application serves.
The spec is the same object users ``serve run`` locally, so the cluster runs what was tested.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build", "load_spec"]


def load_spec(import_path: str) -> Any:
    """Import ``module:attr`` and return it as a ServingSpec.

    Raises:
        ValueError: a malformed path, or an attribute that is neither a ServingSpec nor a ModelDeployment.
    """
    from serving.pools import ServingSpec

    module, sep, attr = import_path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"spec ({import_path!r}) must be an import path 'package.module:attribute'")
    obj = getattr(importlib.import_module(module), attr)
    try:
        return ServingSpec.of(obj)
    except TypeError as e:
        raise ValueError(f"spec ({import_path!r}): {e}") from None


def build(args: dict[str, Any]) -> Any:
    """Build the application serving ``args['deployment']`` of the spec at ``args['spec']``."""
    spec = load_spec(str(args.get("spec", "")))
    name = args.get("deployment")
    apps = spec.build()
    key = f"/{name}"
    if key not in apps:
        raise ValueError(
            f"deployment ({name!r}) is not in spec {args.get('spec')!r}; it has {', '.join(d.name for d in spec.deployments)}"
        )
    return apps[key]
