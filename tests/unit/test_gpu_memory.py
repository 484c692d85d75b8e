"""GPU memory with fakes at the hardware boundary: NVML telemetry, the allocator, the start-up check,
the memory model, admission and classified out-of-memory recovery."""

import gc
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch

from autoscaling.policy import PolicyContext
from autoscaling.predictive import PredictivePolicy
from serving.errors import RequestTooLargeForDevice, http_status_for
from serving.gpu import DeviceMemoryError, GpuTelemetry, check_free_memory
from serving._private.memory import memory_budget_bytes
from serving._private.oom import BatchRunner, MemoryModel, is_oom

GiB = 2**30


class NotSupported(Exception):
    pass


class FakeNvml:
    """pynvml's functions over a list of fake GPUs."""

    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def __init__(self, gpus, fail_init=False):
        self.g = gpus
        self.fail_init = fail_init
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1
        if self.fail_init:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    def nvmlDeviceGetCount(self):
        return len(self.g)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.g[i]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"].encode()

    def nvmlDeviceGetName(self, h):
        return h["name"]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=h["used"], total=h["total"], free=h["total"] - h["used"])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlDeviceGetTemperature(self, h, kind):
        return h["temp"]

    def nvmlDeviceGetPowerUsage(self, h):
        return h["power_mw"]

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        if h.get("ecc") is None:
            raise NotSupported("NVML_ERROR_NOT_SUPPORTED")
        return h["ecc"]


def gpu(i, used_gib, total_gib=80, ecc=None):
    return {"uuid": f"GPU-{i}aaa-bbbb", "name": "NVIDIA H100 80GB HBM3", "used": used_gib * GiB, "total": total_gib * GiB,
            "util": 37, "temp": 55, "power_mw": 312_000, "ecc": ecc}


def test_telemetry_reads_each_visible_gpu_in_cuda_order():
    nvml = FakeNvml([gpu(0, 10), gpu(1, 60, ecc=0), gpu(2, 5)])
    t = GpuTelemetry(nvml=nvml, visible_devices="2,1")
    s = t.gpus()
    assert [x.uuid for x in s] == ["GPU-2aaa-bbbb", "GPU-1aaa-bbbb"]
    assert [x.index for x in s] == [0, 1]  # what torch calls cuda:0 and cuda:1 in this process
    assert s[0].memory_used_bytes == 5 * GiB and s[0].utilization_ratio == 0.37 and s[0].power_w == 312.0
    assert s[0].ecc_uncorrected_errors is None and s[1].ecc_uncorrected_errors == 0  # unsupported ≠ zero
    assert t.headroom_ratio(0.9) == pytest.approx(0.9 - 60 / 80)


def test_telemetry_maps_uuids_and_sees_nothing_when_no_gpu_is_assigned():
    nvml = FakeNvml([gpu(0, 1), gpu(1, 1)])
    assert [x.uuid for x in GpuTelemetry(nvml=nvml, visible_devices="GPU-1aaa-bbbb").gpus()] == ["GPU-1aaa-bbbb"]
    none = GpuTelemetry(nvml=nvml, visible_devices="")
    assert not none.available and none.gpus() == [] and "no GPU is visible" in none.reason
    assert GpuTelemetry(nvml=nvml, visible_devices=None).available  # unset: all GPUs


def test_without_nvml_it_says_so_once_and_reports_nothing(caplog):
    nvml = FakeNvml([], fail_init=True)
    t = GpuTelemetry(nvml=nvml)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        for _ in range(3):
            assert t.gpus() == [] and t.headroom_ratio(0.9) is None
    assert nvml.inits == 1
    said = [r.message for r in caplog.records if "GPU telemetry off" in r.message]
    assert len(said) == 1 and "NVML unavailable" in said[0]
    assert t.snapshot()["available"] is False


def test_allocator_statistics_come_from_torch_memory_stats():
    stats = {"allocated_bytes.all.current": 3 * GiB, "reserved_bytes.all.current": 4 * GiB,
             "allocated_bytes.all.peak": 6 * GiB, "num_ooms": 2}
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, memory_stats=lambda i: stats)
    [a] = GpuTelemetry(nvml=FakeNvml([]), cuda=cuda).allocator()
    assert (a.allocated_bytes, a.reserved_bytes, a.peak_allocated_bytes, a.oom_count) == (3 * GiB, 4 * GiB, 6 * GiB, 2)
    off = SimpleNamespace(is_available=lambda: False)
    assert GpuTelemetry(nvml=FakeNvml([]), cuda=off).allocator() == []


def test_start_up_fails_fast_when_another_process_holds_the_gpu():
    cuda = SimpleNamespace(mem_get_info=lambda d: (2 * GiB, 80 * GiB))
    with pytest.raises(DeviceMemoryError, match=r"cuda:0 has 2.00 GiB free of 80.00 GiB.*needs about 15.00 GiB.*nvidia-smi"):
        check_free_memory(cuda, 0, 15 * GiB, "model '/models/x'")
    check_free_memory(cuda, 0, 1 * GiB, "model '/models/x'")  # enough: no error


# -- the memory model and admission ------------------------------------------------------------


ENVELOPE = [
    {"batch_size": 1, "input_tokens": 12, "peak_bytes": 80_675_328},
    {"batch_size": 8, "input_tokens": 12, "peak_bytes": 81_412_096},
    {"batch_size": 1, "input_tokens": 512, "peak_bytes": 84_931_072},
    {"batch_size": 8, "input_tokens": 512, "peak_bytes": 115_266_048},
]  # measured on an H200 (docs/benchmarks.md)


def test_memory_model_fits_the_envelope_without_under_predicting_it():
    m = MemoryModel.from_envelope(ENVELOPE)
    for e in ENVELOPE:
        assert m.predict(e["batch_size"], e["input_tokens"]) >= e["peak_bytes"]
    assert m.per_token_bytes > 0
    # Beyond the envelope: the same H200 run measured 149,934,592 bytes at a 2x batch (16 x 512).
    assert m.predict(16, 512) == pytest.approx(149_934_592, rel=0.01)
    assert MemoryModel.from_envelope([]) is None
    one = MemoryModel.from_envelope([{"batch_size": 4, "input_tokens": 100, "peak_bytes": 1000}])
    assert one.predict(4, 100) >= 1000


class Item:
    def __init__(self, text, tokens=10):
        self.text, self.tokens = text, tokens


def runner(run_batch, model=None, budget=None, max_ooms=5, clock=None, freed=None):
    t = {"now": 0.0}
    return BatchRunner(
        run_batch,
        lambda it: it.tokens,
        model,
        budget,
        free_cache=(lambda: freed.append(1)) if freed is not None else (lambda: None),
        clock=clock or (lambda: t["now"]),
        window_s=60.0,
        max_ooms=max_ooms,
    )


def echo(items):
    return [it.text for it in items]


def test_admission_cuts_batches_to_fit_and_refuses_what_cannot_fit_alone():
    model = MemoryModel(base_bytes=1000.0, per_token_bytes=1.0)
    seen = []

    def run(items):
        seen.append(len(items))
        return echo(items)

    r = runner(run, model, budget=1000.0 + 40)  # fits 4 items of 10 tokens
    items = [Item(f"t{i}") for i in range(10)] + [Item("huge", tokens=100)]
    out = r.run(items)
    assert seen == [4, 4, 2]
    assert [o.value for o in out[:10]] == [f"t{i}" for i in range(10)]
    err = out[10].error
    assert isinstance(err, RequestTooLargeForDevice) and http_status_for(err) == 413
    assert "100 tokens" in err.message and "MiB" in err.message and err.code == "request_too_large_for_device"


def oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_load_induced_oom_is_split_and_every_request_answered():
    freed, seen = [], []

    def run(items):
        seen.append(len(items))
        if len(items) > 2:
            raise oom()
        return echo(items)

    r = runner(run, freed=freed)
    out = r.run([Item(f"t{i}") for i in range(8)])
    assert [o.value for o in out] == [f"t{i}" for i in range(8)]
    assert seen == [8, 4, 2, 2, 4, 2, 2] and len(freed) == 3 and r.oom_total == 3


def test_a_single_request_that_runs_out_of_memory_gets_a_413_not_a_retry_loop():
    calls = []

    def run(items):
        calls.append(len(items))
        if any(it.text == "big" for it in items):
            raise oom()
        return echo(items)

    out = runner(run).run([Item("a"), Item("big", tokens=500), Item("b")])
    assert out[0].value == "a" and out[2].value == "b"
    assert isinstance(out[1].error, RequestTooLargeForDevice)
    # a, b, and the big one alone twice (once more after the cache was freed): no retry loop.
    assert calls.count(1) <= 4


def test_memory_is_freed_only_after_the_failed_attempt_is_released():
    """The retry must happen outside the except block: the exception's traceback pins the failed
    attempt's tensors (an H200 run that retried inside it recovered nothing)."""
    alive = []

    class Activations:
        pass

    def run(items):
        acts = Activations()  # stands for the batch's activations, referenced by this frame
        alive.append(weakref.ref(acts))
        if len(items) > 1:
            raise oom()
        return echo(items)

    released = []

    def free_cache():
        gc.collect()
        released.append(alive[0]() is None)

    r = BatchRunner(run, lambda it: 1, None, None, free_cache, lambda: 0.0)
    assert [o.value for o in r.run([Item("a"), Item("b")])] == ["a", "b"]
    assert released[0] is True


def test_persistent_ooms_mark_the_replica_unhealthy_until_the_window_passes():
    from serving.errors import ModelNotReady, http_status_for

    t = {"now": 0.0}
    device = {"broken": False}
    kinds = []

    def run(items):
        if device["broken"]:
            raise oom()
        return echo(items)

    r = runner(run, max_ooms=2, clock=lambda: t["now"])
    r.oom_log.on_oom = kinds.append
    assert r.run([Item("x")])[0].value == "x"  # a request of 10 tokens completed here
    device["broken"] = True
    for k in range(3):
        t["now"] = float(k)
        err = r.run([Item("x")])[0].error  # as large as one that completed: the device's trouble
        assert isinstance(err, ModelNotReady) and http_status_for(err) == 503 and err.code == "device_out_of_memory"
    assert kinds == ["persistent"] * 3
    reason = r.unhealthy_reason()
    assert reason and "3 out-of-memory errors in the last 60 s (limit 2)" in reason
    t["now"] = 100.0
    assert r.unhealthy_reason() is None


def test_requests_too_large_for_the_device_get_413_and_never_count_against_the_replica():
    kinds = []

    def run(items):
        if any(it.tokens > 100 for it in items):
            raise oom()
        return echo(items)

    r = runner(run, max_ooms=2)
    r.oom_log.on_oom = kinds.append
    assert r.run([Item("small")])[0].value == "small"
    for _ in range(10):  # far more than max_ooms, within the window
        assert isinstance(r.run([Item("huge", tokens=5000)])[0].error, RequestTooLargeForDevice)
    assert r.unhealthy_reason() is None and set(kinds) == {"too_large"}
    assert r.run([Item("small")])[0].value == "small"


def test_load_induced_ooms_never_count_against_the_replica():
    def run(items):
        if len(items) > 1:
            raise oom()
        return echo(items)

    r = runner(run, max_ooms=1)
    for _ in range(5):
        assert [o.value for o in r.run([Item("a"), Item("b")])] == ["a", "b"]
    assert r.unhealthy_reason() is None and r.oom_total == 5


def test_other_errors_fail_only_their_own_item():
    def run(items):
        if any(it.text == "bad" for it in items):
            raise ValueError("tokenizer broke on this one")
        return echo(items)

    out = runner(run).run([Item("a"), Item("bad"), Item("b")])
    assert out[0].value == "a" and out[2].value == "b" and isinstance(out[1].error, ValueError)


@pytest.mark.parametrize(
    "exc, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), True),
        (MemoryError(), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_oom(exc, expected):
    assert is_oom(exc) is expected


def test_cpu_budget_is_the_high_water_share_of_the_replicas_memory():
    assert memory_budget_bytes("cpu", 0.9, memory_bytes=10 * GiB) == pytest.approx(9 * GiB)
    assert memory_budget_bytes("cpu", 0.5) > 0  # from the cgroup or the machine


def test_low_memory_headroom_asks_for_one_more_replica_and_blocks_scale_down():
    pol = PredictivePolicy()

    def ctx(t, headroom, starting=0):
        return PolicyContext(now_s=t, ready_replicas=4, starting_replicas=starting, min_replicas=1, max_replicas=10,
                             slots_per_replica=16, arrivals_per_s=1.0, work_s_per_request=1.0, ongoing_requests=1.0,
                             memory_headroom_ratio=headroom)

    st: dict = {}
    d, st = pol.decide(ctx(0.0, 0.02), st)
    assert d.replicas == 5
    d, st = pol.decide(ctx(10.0, 0.02, starting=1), st)
    assert d.replicas == 5  # one at a time
    d, st = pol.decide(ctx(1000.0, 0.5), {"guard": {"since_s": -1e9, "last_up_s": -1e9}})
    assert d.replicas < 4  # plenty of headroom and little load: it may come down


@pytest.mark.parametrize(
    "memory, match",
    [
        ({"high_water_ratio": 1.5}, "high_water_ratio"),
        ({"max_ooms_in_window": -1}, "max_ooms_in_window"),
        ({"oom_window_s": 0}, "oom_window_s"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_memory_spec_rejects_bad_settings_by_field(memory, match):
    from pydantic import ValidationError

    from serving import MemorySpec

    with pytest.raises(ValidationError, match=match):
        MemorySpec(**memory)


def test_one_log_counts_each_paths_persistent_errors_once_toward_the_replicas_health():
    # The replica's batches and its task's own paths (a generation scheduler, streams) share one OomLog:
    # one error on each is two in the window, and neither path counts the other's again.
    from serving.gpu import OomLog

    t = {"now": 0.0}
    log = OomLog(clock=lambda: t["now"], window_s=60.0, max_ooms=1)
    device = {"broken": False}

    def run(items):
        if device["broken"]:
            raise oom()
        return echo(items)

    r = BatchRunner(run, lambda it: it.tokens, None, None, lambda: None, lambda: 0.0, oom_log=log)
    assert r.run([Item("x")])[0].value == "x" and log.largest_ok_tokens == 10
    device["broken"] = True
    assert r.run([Item("x")])[0].error.code == "device_out_of_memory"
    assert log.unhealthy_reason() is None
    assert log.lone_error(10, "fix").code == "device_out_of_memory"  # as the scheduler classifies its own
    assert log.counts == {"persistent": 2} and "2 out-of-memory errors" in log.unhealthy_reason()
    t["now"] = 61.0
    assert log.unhealthy_reason() is None
