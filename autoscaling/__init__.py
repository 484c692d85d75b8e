"""gpuserve autoscaling: lead-time-aware policies for GPU pools, and a trace-replay simulator.

Public API:

* :class:`PolicyContext`, :class:`Decision`, :class:`Guardrail`, :func:`make_policy`, :func:`policy_names`:
  the pure policy contract (a context with ``now_s`` in, a decision and a JSON-able state out) and the
  registry of built-in policies by name (``predictive``, ``ray_default``, ``kpa``, ``hpa``, ``oracle``).
* :class:`PredictivePolicy`: forecast at the pool's lead time, reactive floor, churn control.
* :class:`SimConfig`, :func:`simulate`, :func:`prepare`, :func:`load_trace`: the simulator.
* ``autoscaling.ray_policy.GpuservePolicy``: the Ray Serve adapter (imported by Ray from a config, not here).
* ``autoscaling.signals``: the names of the load signals replicas report to it (the shared contract).

Nothing here imports Ray at import time; ``ray_default`` calls Ray's own functions when it runs.
"""

from autoscaling.policy import Decision, Guardrail, PolicyContext, make_policy, policy_names
from autoscaling.predictive import PredictivePolicy
from autoscaling.simulator import SimConfig, SimResult, prepare, simulate
from autoscaling.traces import load_trace

__all__ = [
    "Decision",
    "Guardrail",
    "PolicyContext",
    "PredictivePolicy",
    "SimConfig",
    "SimResult",
    "load_trace",
    "make_policy",
    "policy_names",
    "prepare",
    "simulate",
]
