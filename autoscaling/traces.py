"""Load request traces for the simulator; the format is detected from the CSV header.

Formats:

* **Azure LLM inference** (per request): ``TIMESTAMP,ContextTokens,GeneratedTokens``.
* **ServeGen rate windows**: ``window_start_s,...,rate_rps,...,rate_weighted_cv,all_zero``; arrivals
  inside a window are drawn from that window's inter-arrival CV (synthetic structure: say so).
  Windows marked ``all_zero`` are collection gaps and are interpolated from their neighbours.
* **Generic per request** (documented in docs/autoscaling.md): ``arrival_s,input_tokens,output_tokens``;
  the token columns may be empty or absent (then every request takes ``service_time_s``).
"""

from __future__ import annotations

import csv
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class RequestTrace:
    """One row per request. Times in seconds from the first arrival, sorted."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray | None
    output_tokens: np.ndarray | None
    source: str

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self.arrival_s) else 0.0


@dataclass
class RateTrace:
    """Arrival rates per fixed window, with the inter-arrival CV inside each window."""

    window_s: float
    rate_per_s: np.ndarray
    cv: np.ndarray
    source: str
    interpolated_windows: int = 0

    @property
    def duration_s(self) -> float:
        return self.window_s * len(self.rate_per_s)


Trace = RequestTrace | RateTrace


class TraceFormatError(ValueError):
    """A trace file whose header or rows do not match a known format."""


def load_trace(path: str | Path) -> Trace:
    """Read a trace, choosing the parser by its header.

    Raises:
        TraceFormatError: unknown header (the message lists the accepted ones) or a bad row.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TraceFormatError(f"trace {path}: empty file") from None
        rows = [r for r in reader if r and any(c.strip() for c in r)]
    cols = set(header)
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= cols:
        return _azure(path, header, rows)
    if {"window_start_s", "rate_rps"} <= cols:
        return _servegen(path, header, rows)
    if "arrival_s" in cols:
        return _generic(path, header, rows)
    raise TraceFormatError(
        f"trace {path}: header {header} is not a known format; expected one of: "
        "'TIMESTAMP,ContextTokens,GeneratedTokens' (Azure), 'window_start_s,...,rate_rps,...' (ServeGen), "
        "'arrival_s,input_tokens,output_tokens' (generic)"
    )


def _col(header: list[str], name: str) -> int:
    return header.index(name)


def _azure(path: Path, header: list[str], rows: list[list[str]]) -> RequestTrace:
    it, ic, ig = _col(header, "TIMESTAMP"), _col(header, "ContextTokens"), _col(header, "GeneratedTokens")
    times, ins, outs = [], [], []
    for n, r in enumerate(rows, start=2):
        try:
            ts = r[it].strip()
            # Seven fractional digits: Python parses at most six.
            if "." in ts:
                head, frac = ts.split(".", 1)
                ts = f"{head}.{frac[:6]}"
            times.append(_dt.datetime.fromisoformat(ts).timestamp())
            ins.append(int(r[ic]))
            outs.append(int(r[ig]))
        except (ValueError, IndexError) as e:
            raise TraceFormatError(f"trace {path}: line {n}: {e}") from None
    t = np.array(times)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return RequestTrace(t, np.array(ins)[order], np.array(outs)[order], source=f"azure:{path.name}")


def _generic(path: Path, header: list[str], rows: list[list[str]]) -> RequestTrace:
    ia = _col(header, "arrival_s")
    ii = header.index("input_tokens") if "input_tokens" in header else None
    io = header.index("output_tokens") if "output_tokens" in header else None
    times, ins, outs = [], [], []
    for n, r in enumerate(rows, start=2):
        try:
            a = float(r[ia])
            if a < 0:
                raise ValueError(f"arrival_s ({a}) must be >= 0")
            times.append(a)
            if ii is not None and io is not None and r[ii].strip() and r[io].strip():
                ins.append(int(r[ii]))
                outs.append(int(r[io]))
        except (ValueError, IndexError) as e:
            raise TraceFormatError(f"trace {path}: line {n}: {e}") from None
    if not times:
        raise TraceFormatError(f"trace {path}: no requests")
    t = np.array(times)
    order = np.argsort(t, kind="stable")
    has_tokens = len(ins) == len(times)
    return RequestTrace(
        t[order] - t[order][0],
        np.array(ins)[order] if has_tokens else None,
        np.array(outs)[order] if has_tokens else None,
        source=f"generic:{path.name}",
    )


def _servegen(path: Path, header: list[str], rows: list[list[str]]) -> RateTrace:
    iw, ir = _col(header, "window_start_s"), _col(header, "rate_rps")
    icv = header.index("rate_weighted_cv") if "rate_weighted_cv" in header else None
    iz = header.index("all_zero") if "all_zero" in header else None
    starts, rates, cvs, gaps = [], [], [], []
    for n, r in enumerate(rows, start=2):
        try:
            starts.append(float(r[iw]))
            rates.append(float(r[ir]))
            cvs.append(float(r[icv]) if icv is not None and r[icv].strip() else 1.0)
            gaps.append(iz is not None and r[iz].strip() == "1")
        except (ValueError, IndexError) as e:
            raise TraceFormatError(f"trace {path}: line {n}: {e}") from None
    if len(starts) < 2:
        raise TraceFormatError(f"trace {path}: needs at least two windows")
    window = starts[1] - starts[0]
    rate, cv, gap = np.array(rates), np.array(cvs), np.array(gaps)
    good = ~gap
    if gap.any():
        idx = np.arange(len(rate))
        rate[gap] = np.interp(idx[gap], idx[good], rate[good])
        cv[gap] = np.interp(idx[gap], idx[good], cv[good])
    cv = np.where(cv > 0, cv, 1.0)
    return RateTrace(window, rate, cv, source=f"servegen:{path.name}", interpolated_windows=int(gap.sum()))


def per_second_counts(trace: RateTrace, scale: float, seed: int, max_cv: float = 4.0) -> np.ndarray:
    """Arrivals per second: each window's rate times ``scale``, with second-to-second variation from its CV.

    For a renewal process with inter-arrival CV c, the count over a second has variance ≈ rate · c²;
    counts are drawn from a Gamma with that mean and variance (fluid: fractional counts are fine).
    CVs are capped at ``max_cv``: the ServeGen trace's CVs run up to ~500, which would put a whole
    10-minute window's traffic into a handful of seconds and test nothing but the queue bound.
    """
    rng = np.random.default_rng(seed)
    per = int(round(trace.window_s))
    lam = np.repeat(trace.rate_per_s * scale, per)
    var_factor = np.repeat(np.minimum(trace.cv, max_cv) ** 2, per)
    shape = np.where(lam > 0, lam / np.maximum(var_factor, 1e-9), 1.0)
    draws = rng.gamma(shape, np.maximum(var_factor, 1e-9))
    return np.where(lam > 0, draws, 0.0)


def replicate(trace: RequestTrace, factor: float, seed: int, jitter_s: float = 10.0) -> RequestTrace:
    """Scale a per-request trace's rate by ``factor`` without changing its time axis.

    Each request is kept ``floor(factor)`` times plus once more with probability ``frac(factor)``
    (thinning when factor < 1); copies are shifted by a uniform jitter up to ``jitter_s`` and take
    the token counts of a random request, so the minute-scale shape is kept and no two requests are
    exact twins.
    """
    rng = np.random.default_rng(seed)
    n = len(trace.arrival_s)
    whole, frac = int(factor), factor - int(factor)
    copies = np.full(n, whole) + (rng.random(n) < frac)
    idx = np.repeat(np.arange(n), copies)
    first = np.concatenate([[True], idx[1:] != idx[:-1]]) if len(idx) else np.array([], bool)
    shift = np.where(first, 0.0, rng.uniform(0, jitter_s, len(idx)))
    t = trace.arrival_s[idx] + shift
    donor = np.where(first, idx, rng.integers(0, n, len(idx)))
    order = np.argsort(t, kind="stable")
    ins = trace.input_tokens[donor][order] if trace.input_tokens is not None else None
    outs = trace.output_tokens[donor][order] if trace.output_tokens is not None else None
    return RequestTrace(t[order], ins, outs, source=f"{trace.source} x{factor:.3g}")
