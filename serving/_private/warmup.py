"""Warm-up: run representative work until latency is stable, and record its memory envelope.

Pure apart from the task it drives: the clock and the memory probe are
arguments, so the stopping rule and the envelope are unit-tested with fakes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from serving._private.memory import MemoryProbe
from serving.spec import ModelDeployment


class WarmupError(RuntimeError):
    """Warm-up inference failed: the replica must not become ready."""


@dataclass(frozen=True)
class Shape:
    """One warm-up workload: ``batch_size`` requests of about ``input_tokens`` tokens each."""

    label: str
    batch_size: int
    input_tokens: int


@dataclass
class ShapeResult:
    shape: Shape
    latencies_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0


@dataclass
class WarmupReport:
    """What warm-up measured; kept on the replica for readiness, health and admission."""

    rounds: int
    stable: bool
    seconds: float
    memory_kind: str
    memory_exact: bool
    shapes: list[ShapeResult]

    @property
    def slowest_batch_s(self) -> float:
        """The slowest shape's last-round latency: a steady-state worst case."""
        return max((r.latencies_s[-1] for r in self.shapes if r.latencies_s), default=0.0)

    def envelope(self) -> list[dict[str, Any]]:
        """Peak memory per shape, largest first."""
        rows = [
            {
                "shape": r.shape.label,
                "batch_size": r.shape.batch_size,
                "input_tokens": r.shape.input_tokens,
                "peak_bytes": r.peak_bytes,
                "latency_s": round(r.latencies_s[-1], 6) if r.latencies_s else None,
            }
            for r in self.shapes
        ]
        return sorted(rows, key=lambda x: -x["peak_bytes"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "stable": self.stable,
            "seconds": round(self.seconds, 4),
            "memory": {"kind": self.memory_kind, "exact": self.memory_exact},
            "envelope": self.envelope(),
        }


def plan_shapes(task: Any, spec: ModelDeployment) -> list[tuple[Shape, list[Any]]]:
    """The warm-up workloads: given inputs and a max-length input, at batch 1 and the max batch."""
    w = spec.warmup
    max_batch = spec.batching.max_batch_size if spec.batching.enabled else 1
    sizes = sorted({1, max_batch})
    plans: list[tuple[Shape, list[Any]]] = []
    groups: list[tuple[str, list[Any]]] = []
    if w.inputs:
        groups.append(("inputs", task.warmup_items(w.inputs)))
    if w.cover_max_input:
        groups.append(("max_input", task.warmup_items([task.synthetic_input(task.max_input_tokens_for_warmup())])))
    for name, items in groups:
        tokens = max(task.item_tokens(it) for it in items)
        for b in sizes:
            batch = (items * b)[:b]
            plans.append((Shape(f"{name}x{b}", b, tokens), batch))
    return plans


def is_stable(results: list[ShapeResult], within: float) -> bool:
    """Every shape's last latency is within ``within`` (relative) of the one before."""
    for r in results:
        if len(r.latencies_s) < 2:
            return False
        prev, last = r.latencies_s[-2], r.latencies_s[-1]
        if prev <= 0 or abs(last - prev) / prev > within:
            return False
    return True


def run_warmup(
    run_batch: Callable[[list[Any]], Any],
    plans: list[tuple[Shape, list[Any]]],
    spec: ModelDeployment,
    probe: MemoryProbe,
    clock: Callable[[], float] = time.perf_counter,
) -> WarmupReport:
    """Run the planned shapes in rounds until stable or ``max_rounds``.

    Raises:
        WarmupError: naming the shape that failed and the cause.
    """
    w = spec.warmup
    t0 = clock()
    results = [ShapeResult(shape) for shape, _ in plans]
    rounds, stable = 0, False
    while rounds < w.max_rounds:
        rounds += 1
        for (shape, items), res in zip(plans, results):
            probe.reset_peak()
            start = clock()
            try:
                run_batch(items)
            except Exception as e:  # noqa: BLE001 - re-raised with the shape named
                raise WarmupError(
                    f"warm-up failed on shape {shape.label} (batch {shape.batch_size} x ~{shape.input_tokens} tokens): "
                    f"{type(e).__name__}: {e}; check warmup.inputs, batching.max_batch_size and the model"
                ) from e
            res.latencies_s.append(clock() - start)
            res.peak_bytes = max(res.peak_bytes, probe.peak_bytes())
        if rounds >= w.min_rounds and is_stable(results, w.stable_within):
            stable = True
            break
    return WarmupReport(
        rounds=rounds,
        stable=stable,
        seconds=clock() - t0,
        memory_kind=probe.kind,
        memory_exact=probe.exact,
        shapes=results,
    )


# Floors and multipliers for the derived stall threshold (documented in HealthSpec).
STALL_FLOOR_S = 10.0
STALL_BATCH_MULTIPLE = 10.0


def derive_stall_after_s(spec: ModelDeployment, report: WarmupReport | None, load_s: float) -> float:
    """The stall threshold: configured, or derived from what warm-up measured."""
    if spec.health.stall_after_s is not None:
        return spec.health.stall_after_s
    if report is not None and report.slowest_batch_s > 0:
        return max(STALL_FLOOR_S, STALL_BATCH_MULTIPLE * report.slowest_batch_s)
    return max(STALL_FLOOR_S, load_s)
