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

from importlib import import_module

# Each public name and the module that defines it. Loaded on first use, so that importing a light
# submodule (``autoscaling.signals``, which a client reaches through ``serving.protocol``) does not
# load the simulator and numpy.
_EXPORTS = {
    "Decision": "autoscaling.policy",
    "Guardrail": "autoscaling.policy",
    "PolicyContext": "autoscaling.policy",
    "make_policy": "autoscaling.policy",
    "policy_names": "autoscaling.policy",
    "PredictivePolicy": "autoscaling.predictive",
    "SimConfig": "autoscaling.simulator",
    "SimResult": "autoscaling.simulator",
    "prepare": "autoscaling.simulator",
    "simulate": "autoscaling.simulator",
    "load_trace": "autoscaling.traces",
}


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'autoscaling' has no attribute {name!r}") from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
