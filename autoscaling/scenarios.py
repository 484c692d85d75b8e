"""Synthetic traffic scenarios for developing and checking autoscaling policies.

Each scenario is a shape of the arrival rate over time, as a fraction of its peak, drawn from a seed;
:func:`make_scenario` turns it into a per-request trace (a Poisson process at that rate, each second
its own count) or, for the multi-day scenario, a per-minute rate trace. None of them is a replay of a
real trace: they are the shapes that break autoscalers (bursts shorter than a node's lead time,
regime switches, a flash crowd on a daily cycle, ramps, drops, a surge after a long idle), so that a
policy tuned on the real traces can be checked on traffic it has not seen.

Shapes (``peak_rate_per_s`` is the rate at a shape value of 1):

* ``on_off_bursts``: a low background with bursts of 1-3 min separated by 2-6 min gaps
  (minute-scale on/off traffic, like interactive code completion).
* ``mmpp``: a Markov-modulated Poisson process with three levels and exponential sojourns
  (mean 5 min).
* ``diurnal_flash_crowd``: two days with a 1:3 daily cycle; on the second afternoon a flash crowd
  doubles the load within a minute for 20 minutes (per-minute rate trace).
* ``slow_ramp``: from 10 % to the peak over 90 minutes, then flat.
* ``abrupt_drop``: the peak for 45 minutes, then 15 % for the rest.
* ``idle_then_surge``: near idle (2 %) for an hour, a surge to the peak within two minutes for
  30 minutes, then 30 %.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from autoscaling.traces import RateTrace, RequestTrace, Trace

Shape = Callable[[np.random.Generator], np.ndarray]


def _on_off(rng: np.random.Generator, duration_s: int = 7200) -> np.ndarray:
    r = np.full(duration_s, 0.2)
    t = int(rng.uniform(60, 240))
    while t < duration_s:
        on = int(rng.uniform(60, 180))
        r[t : t + on] = rng.uniform(0.6, 1.0)
        t += on + int(rng.uniform(120, 360))
    return r


def _mmpp(rng: np.random.Generator, duration_s: int = 7200) -> np.ndarray:
    levels = np.array([0.2, 0.5, 1.0])
    r = np.empty(duration_s)
    t, state = 0, 0
    while t < duration_s:
        stay = max(1, int(rng.exponential(300.0)))
        r[t : t + stay] = levels[state]
        t += stay
        state = int(rng.choice([s for s in range(3) if s != state]))
    return r


def _diurnal_flash(rng: np.random.Generator) -> np.ndarray:
    minutes = np.arange(2 * 1440)
    # Trough at 04:00, peak at 16:00; 1:3.
    r = (2.0 - np.cos(2 * np.pi * ((minutes - 240) % 1440) / 1440)) / 3.0 * 0.5
    start = 1440 + int(rng.uniform(13 * 60, 17 * 60))
    r[start : start + 20] *= 2.0
    return r


def _slow_ramp(rng: np.random.Generator, duration_s: int = 7200) -> np.ndarray:
    t = np.arange(duration_s)
    return np.minimum(1.0, 0.1 + 0.9 * t / 5400.0)


def _abrupt_drop(rng: np.random.Generator, duration_s: int = 7200) -> np.ndarray:
    r = np.full(duration_s, 0.15)
    r[:2700] = 1.0
    return r


def _idle_surge(rng: np.random.Generator, duration_s: int = 7200) -> np.ndarray:
    r = np.full(duration_s, 0.3)
    r[:3600] = 0.02
    r[3600:3720] = np.linspace(0.02, 1.0, 120)
    r[3720:5400] = 1.0
    return r


# name -> (shape, seconds per shape value: 1 for per-request traces, 60 for a per-minute rate trace)
_SCENARIOS: dict[str, tuple[Shape, int]] = {
    "on_off_bursts": (_on_off, 1),
    "mmpp": (_mmpp, 1),
    "diurnal_flash_crowd": (_diurnal_flash, 60),
    "slow_ramp": (_slow_ramp, 1),
    "abrupt_drop": (_abrupt_drop, 1),
    "idle_then_surge": (_idle_surge, 1),
}


def scenario_names() -> list[str]:
    """Names of the built-in scenarios."""
    return list(_SCENARIOS)


def make_scenario(name: str, peak_rate_per_s: float = 100.0, seed: int = 0) -> Trace:
    """Draw one scenario.

    Args:
        name: One of :func:`scenario_names`.
        peak_rate_per_s: Arrivals per second at the shape's peak.
        seed: Seed for the shape's random parts and for the arrivals.

    Returns:
        A :class:`RequestTrace` (no token counts: every request takes the simulator's
        ``service_time_s``) or, for ``diurnal_flash_crowd``, a :class:`RateTrace` of minutes.

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a rate that is not positive.
    """
    if name not in _SCENARIOS:
        raise ValueError(f"scenario {name!r} is not built in; use one of {', '.join(scenario_names())}")
    if not peak_rate_per_s > 0:
        raise ValueError(f"peak_rate_per_s ({peak_rate_per_s}) must be > 0")
    shape, step_s = _SCENARIOS[name]
    rng = np.random.default_rng(seed)
    rate = shape(rng) * peak_rate_per_s
    if step_s != 1:
        return RateTrace(window_s=float(step_s), rate_per_s=rate, cv=np.ones(len(rate)), source=f"scenario:{name}")
    counts = rng.poisson(rate)
    arrivals = np.repeat(np.arange(len(rate), dtype=float), counts) + rng.random(int(counts.sum()))
    arrivals.sort()
    return RequestTrace(arrivals - arrivals[0], None, None, source=f"scenario:{name}")
