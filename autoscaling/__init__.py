"""gpuserve autoscaling: lead-time-aware policies for GPU pools (see the autoscaling issue).

Nothing is exported yet; until then deployments use Ray Serve's default policy
or a custom one named by import path in ``AutoscalingSpec.policy``.
"""

__all__: list[str] = []
