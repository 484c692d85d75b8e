"""gpuserve on Kubernetes: rendering RayService manifests (see the KubeRay issue).

Nothing is exported yet.
"""

__all__: list[str] = []
