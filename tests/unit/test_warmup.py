"""Warm-up rounds, stability rule, memory envelope and stall threshold, on a fake clock."""

import pytest

from serving import BatchingSpec, HealthSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec
from serving._private.warmup import (
    STALL_FLOOR_S,
    Shape,
    WarmupError,
    derive_stall_after_s,
    plan_shapes,
    run_warmup,
)


def spec(**warmup):
    return ModelDeployment(
        name="m",
        task="embeddings",
        model=ModelSource(path="/x"),
        queue=QueueSpec(max_ongoing_requests=16),
        batching=BatchingSpec(max_batch_size=8),
        warmup=WarmupSpec(**warmup),
    )


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeProbe:
    kind, exact = "fake", True

    def __init__(self):
        self.current = 0

    def reset_peak(self):
        self.current = 0

    def peak_bytes(self):
        return self.current


class ScriptedModel:
    """run_batch whose latency per call comes from a script; memory grows with batch x tokens."""

    def __init__(self, clock, probe, latencies):
        self.clock, self.probe, self.latencies, self.calls = clock, probe, list(latencies), []

    def __call__(self, items):
        self.calls.append(items)
        self.clock.t += self.latencies.pop(0) if self.latencies else 0.01
        self.probe.current = 1000 * len(items) * max(items)


def plans(batch_sizes=(1, 8), tokens=(5, 500)):
    return [(Shape(f"t{t}x{b}", b, t), [t] * b) for t in tokens for b in batch_sizes]


def test_stops_after_min_rounds_when_stable():
    clock, probe = FakeClock(), FakeProbe()
    model = ScriptedModel(clock, probe, [0.01] * 100)
    report = run_warmup(model, plans(), spec(min_rounds=2, max_rounds=5), probe, clock)
    assert report.stable and report.rounds == 2
    assert len(model.calls) == 2 * 4


def test_keeps_going_while_latency_still_falls():
    clock, probe = FakeClock(), FakeProbe()
    # 4 shapes per round; first-call latencies fall 1.0 -> 0.3 -> 0.1 -> 0.1 (cold kernels, allocator growth).
    script = [1.0] * 4 + [0.3] * 4 + [0.1] * 4 + [0.1] * 4
    report = run_warmup(ScriptedModel(clock, probe, script), plans(), spec(min_rounds=2, max_rounds=10), probe, clock)
    assert report.stable and report.rounds == 4
    assert report.seconds == pytest.approx(sum(script))
    assert report.slowest_batch_s == pytest.approx(0.1)


def test_round_limit_reports_unstable():
    clock, probe = FakeClock(), FakeProbe()
    script = ([1.0] * 4 + [0.5] * 4 + [2.0] * 4) * 4  # every shape keeps swinging between rounds
    report = run_warmup(ScriptedModel(clock, probe, script), plans(), spec(min_rounds=2, max_rounds=3), probe, clock)
    assert not report.stable and report.rounds == 3


def test_envelope_has_a_peak_per_shape_largest_first():
    clock, probe = FakeClock(), FakeProbe()
    report = run_warmup(ScriptedModel(clock, probe, []), plans(), spec(), probe, clock)
    env = report.envelope()
    assert [(r["batch_size"], r["input_tokens"]) for r in env] == [(8, 500), (1, 500), (8, 5), (1, 5)]
    assert env[0]["peak_bytes"] == 1000 * 8 * 500
    assert report.to_dict()["memory"] == {"kind": "fake", "exact": True}


def test_failure_names_the_shape():
    clock, probe = FakeClock(), FakeProbe()

    def boom(items):
        if len(items) == 8:
            raise MemoryError("out of memory")

    with pytest.raises(WarmupError, match=r"shape t5x8 \(batch 8 x ~5 tokens\): MemoryError: out of memory"):
        run_warmup(boom, plans(), spec(), probe, clock)


class FakeTask:
    def warmup_items(self, texts):
        return [len(t.split()) for t in texts]

    def synthetic_input(self, n):
        return " ".join(["w"] * n)

    def max_input_tokens_for_warmup(self):
        return 128

    def item_tokens(self, item):
        return item


def test_plan_covers_batch_one_max_batch_and_max_length():
    shapes = [(s.batch_size, s.input_tokens) for s, _ in plan_shapes(FakeTask(), spec(inputs=["a b", "c"]))]
    assert shapes == [(1, 2), (8, 2), (1, 128), (8, 128)]
    only_generated = plan_shapes(FakeTask(), spec(inputs=[]))
    assert [s.input_tokens for s, _ in only_generated] == [128, 128]
    without_max = plan_shapes(FakeTask(), spec(cover_max_input=False))
    assert all(s.label.startswith("inputs") for s, _ in without_max)


def test_stall_threshold_derived_from_measurement():
    clock, probe = FakeClock(), FakeProbe()
    report = run_warmup(ScriptedModel(clock, probe, [3.0] * 100), plans(), spec(), probe, clock)
    assert derive_stall_after_s(spec(), report, load_s=1.0) == pytest.approx(30.0)
    fast = run_warmup(ScriptedModel(clock, probe, [0.01] * 100), plans(), spec(), probe, clock)
    assert derive_stall_after_s(spec(), fast, load_s=1.0) == STALL_FLOOR_S
    assert derive_stall_after_s(spec(enabled=False), None, load_s=42.0) == 42.0
    configured = spec().model_copy(update={"health": HealthSpec(stall_after_s=7)})
    assert derive_stall_after_s(configured, report, load_s=1.0) == 7
