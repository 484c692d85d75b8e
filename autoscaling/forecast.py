"""Online forecasting of the arrival rate, its error, and the pool's lead time; pure functions over a dict.

Everything here keeps its memory in a plain dict (JSON-serialisable) so that the state can live in
Ray Serve's policy state and survive being copied; nothing reads a clock.

* Level and trend: Holt's linear smoothing over the observed rate, trend damped and per second.
* Daily profile: the mean rate per time-of-day bin, each bin updated once per day it is seen (EWMA
  across days). Once both the present bin and the bin at ``now + h`` have been seen, the forecast is
  the profile at ``now + h`` scaled by how today's level compares with the profile now.
* Recent peak: the highest short-window mean rate over a window, the bound on hedging and the
  capacity held while bursts recur (see ``autoscaling.predictive``).
* Lead time: an upper quantile of observed start-ups, with the configured prior counted as one
  observation so a single fast start cannot shrink the horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank, upper), or 0.0 when empty."""
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))
    return s[k]


@dataclass(frozen=True)
class ForecastParams:
    """Forecaster settings (defaults explained in docs/autoscaling.md).

    Attributes:
        level_alpha: Smoothing of the level per update (updates come every policy interval).
        trend_beta: Smoothing of the trend.
        trend_damping_s: The trend's effect fades with this time constant over the horizon.
        season_s: Length of a season (a day).
        season_bins: Bins per season.
        season_weight: Weight of the newest day in a bin's EWMA across days.
        warmup_updates: Updates before the trend is trusted.
        combine: ``max`` of the seasonal and the trend forecast, or ``season`` alone.
        max_trend_lift: The trend may move the forecast by at most this fraction of the level.
    """

    level_alpha: float = 0.3
    trend_beta: float = 0.05
    trend_damping_s: float = 600.0
    season_s: float = 86400.0
    season_bins: int = 144
    season_weight: float = 0.5
    warmup_updates: int = 12
    combine: str = "max"
    max_trend_lift: float = 0.2


def _bin(p: ForecastParams, t_s: float) -> int:
    return int((t_s % p.season_s) / p.season_s * p.season_bins) % p.season_bins


def _profile_at(p: ForecastParams, profile: list[float | None], t_s: float) -> float | None:
    """The profile at ``t_s``, interpolated linearly between neighbouring bin centres."""
    width = p.season_s / p.season_bins
    x = (t_s % p.season_s) / width - 0.5
    i0 = int(x // 1) % p.season_bins
    i1 = (i0 + 1) % p.season_bins
    a, b = profile[i0], profile[i1]
    if a is None or b is None:
        return a if b is None else b
    f = x - (x // 1)
    return a * (1 - f) + b * f


def update(p: ForecastParams, state: dict[str, Any], now_s: float, rate_per_s: float) -> dict[str, Any]:
    """Fold one observation (the rate since the previous update) into the state; returns the new state."""
    st = dict(state)
    level, trend, last_t = st.get("level"), st.get("trend", 0.0), st.get("t")
    st["n"] = st.get("n", 0) + 1
    if level is None or last_t is None:
        st.update(level=rate_per_s, trend=0.0, t=now_s)
    else:
        dt = max(now_s - last_t, 1e-6)
        # A falling trend must not drive the level below zero (no negative arrival rates).
        new_level = max(0.0, p.level_alpha * rate_per_s + (1 - p.level_alpha) * (level + trend * dt))
        st["trend"] = p.trend_beta * (new_level - level) / dt + (1 - p.trend_beta) * trend
        st["level"], st["t"] = new_level, now_s
    # Daily profile: accumulate the current bin; fold it in when the bin changes.
    profile = list(st.get("profile") or [None] * p.season_bins)
    b = _bin(p, now_s)
    acc_bin, acc_sum, acc_n = st.get("acc_bin"), st.get("acc_sum", 0.0), st.get("acc_n", 0)
    if acc_bin is not None and acc_bin != b and acc_n:
        mean = acc_sum / acc_n
        old = profile[acc_bin]
        profile[acc_bin] = mean if old is None else (1 - p.season_weight) * old + p.season_weight * mean
        acc_sum, acc_n = 0.0, 0
    st["acc_bin"], st["acc_sum"], st["acc_n"] = b, acc_sum + rate_per_s, acc_n + 1
    st["profile"] = profile
    return st


def forecast(p: ForecastParams, state: dict[str, Any], now_s: float, horizon_s: float) -> float:
    """The expected rate at ``now_s + horizon_s`` (never negative)."""
    level = state.get("level")
    if level is None:
        return 0.0
    trend = state.get("trend", 0.0)
    damp = p.trend_damping_s
    # Damped trend: the effect of the trend saturates at trend * damping_s; until a few updates have
    # been seen the trend is noise, and even then it may move the forecast by at most half the level.
    if state.get("n", 0) < p.warmup_updates:
        trend = 0.0
    lift = trend * damp * (1 - math.exp(-horizon_s / damp))
    cap = p.max_trend_lift * level
    holt = level + min(cap, max(-cap, lift))
    profile = state.get("profile")
    if profile:
        now_p = _profile_at(p, profile, now_s)
        then_p = _profile_at(p, profile, now_s + horizon_s)
        if now_p and then_p is not None and now_p > 0:
            ratio = min(2.0, max(0.5, level / now_p))
            # Either model may be the one that sees the change coming: a new surge shows in the trend,
            # the evening peak in the profile. Size for the higher.
            seasonal = then_p * ratio
            if p.combine == "season":
                return max(0.0, seasonal)
            return max(0.0, seasonal, holt)
    return max(0.0, holt)


def peak_forecast(p: ForecastParams, state: dict[str, Any], now_s: float, horizon_s: float, steps: int = 6) -> float:
    """The highest forecast over ``[now, now + horizon]`` (capacity asked for now serves all of it)."""
    return max(forecast(p, state, now_s, horizon_s * i / steps) for i in range(steps + 1))


def learn_lead_time(state: dict[str, Any], key: str, observed_s: tuple[float, ...], keep: int = 20) -> dict[str, Any]:
    """Remember observed start-up durations under ``key`` (most recent ``keep``)."""
    if not observed_s:
        return state
    st = dict(state)
    st[key] = (list(st.get(key, [])) + [float(x) for x in observed_s])[-keep:]
    return st


def lead_time_s(state: dict[str, Any], key: str, prior_s: float, q: float = 0.9) -> float:
    """Upper quantile of the observed start-ups under ``key``, the prior counted as one observation."""
    return quantile(list(state.get(key, [])) + [prior_s], q)


def recent_peak(
    state: dict[str, Any], now_s: float, rate_per_s: float, smoothing_s: float, window_s: float, keep_s: float
) -> tuple[dict[str, Any], float]:
    """Add one observed rate; return the new state and the highest ``smoothing_s`` mean within ``window_s``.

    The smoothed value is the mean of the rates observed within the last ``smoothing_s`` (one sample
    when decisions are further apart). ``state`` (JSON-able) holds those rates (``rates``: ``[t, rate]``)
    and a sliding-window maximum over ``keep_s`` (the longest window asked for): ``peaks`` are
    ``[t, smoothed]`` pairs with falling values, a new one dropping every earlier one it equals or
    exceeds, so the peak within any window is the first pair inside it. That keeps the state and
    each decision's work small however long the window (an hour of decisions is 360 samples).
    """
    rates = [x for x in state.get("rates", []) if x[0] > now_s - smoothing_s] + [[now_s, rate_per_s]]
    smoothed = sum(r for _, r in rates) / len(rates)
    horizon = now_s - max(keep_s, window_s, smoothing_s)
    peaks = [x for x in state.get("peaks", []) if x[0] > horizon]
    while peaks and peaks[-1][1] <= smoothed:
        peaks.pop()
    peaks.append([now_s, smoothed])
    start = now_s - max(window_s, smoothing_s)
    peak = next(v for t, v in peaks if t > start)
    return {"rates": rates, "peaks": peaks}, peak
