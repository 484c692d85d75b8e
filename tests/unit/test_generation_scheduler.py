"""The iteration scheduler on a tiny random model loaded via from_pretrained (no Ray): one bounded set of
running sequences, joining and leaving between decode steps, outputs equal to the static path's."""

import threading
import time

import pytest

from deployments._scheduler import Finished, GenerationScheduler, Sequence, supports
from deployments.text_generation import TextGenerationTask
from serving import GenerationSpec, ModelDeployment, ModelSource


def make_task(tiny_lm_dir, mode, **gen):
    spec = ModelDeployment(
        name="tiny",
        task="text_generation",
        model=ModelSource(path=str(tiny_lm_dir)),
        generation=GenerationSpec(scheduler=mode, **gen),
    )
    return TextGenerationTask(spec)


@pytest.fixture(scope="module")
def static(tiny_lm_dir):
    return make_task(tiny_lm_dir, "static")


@pytest.fixture(scope="module")
def iteration(tiny_lm_dir):
    task = make_task(tiny_lm_dir, "iteration")
    yield task
    task.scheduler.close()


class SlowSteps:
    """Wraps a model so each forward pass takes at least ``step_s`` (a slow device), or blocks while
    ``hang`` is set (a hung kernel)."""

    def __init__(self, model, step_s):
        self.model, self.step_s, self.hang = model, step_s, threading.Event()
        self.released = threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **kw):
        if self.hang.is_set():
            self.released.wait(30)
        time.sleep(self.step_s)
        return self.model(**kw)


def seq(lm, prompt, max_tokens, incremental=False):
    """A greedy sequence of ``prompt``."""
    return Sequence(lm.encode(prompt), max_tokens, 0.0, 1.0, [], incremental=incremental)


def wait_for_tokens(s, n):
    while len(s.ids or ()) < n:
        time.sleep(0.002)


PROMPTS = ["Once upon a time", "GPU", "The quick brown fox jumps over the lazy dog", "a" * 30, "serving models"]
MAX_TOKENS = [20, 5, 40, 7, 60]


def bodies(**extra):
    return [{"prompt": p, "max_tokens": m, "temperature": 0, **extra} for p, m in zip(PROMPTS, MAX_TOKENS)]


def test_auto_picks_the_iteration_scheduler_on_cpu_and_static_stays_available(static, iteration, tiny_lm_dir):
    assert (static.scheduler_mode, static.scheduler) == ("static", None)
    assert iteration.scheduler_mode == "iteration" and iteration.runs_concurrently
    auto = make_task(tiny_lm_dir, "auto")
    try:
        assert auto.scheduler_mode == "iteration"
    finally:
        auto.scheduler.close()


def test_greedy_outputs_and_usage_equal_the_static_paths_batched_or_streamed(static, iteration):
    want = static.run_batch([static.parse("completions", b) for b in bodies()])
    got = iteration.run_batch([iteration.parse("completions", b) for b in bodies()])
    assert [g["choices"][0]["text"] for g in got] == [w["choices"][0]["text"] for w in want]
    assert [g["usage"] for g in got] == [w["usage"] for w in want]
    assert [g["choices"][0]["finish_reason"] for g in got] == [w["choices"][0]["finish_reason"] for w in want]
    for body, w in zip(bodies(stream=True), want):
        chunks = list(iteration.stream(iteration.parse("completions", body), threading.Event()))
        assert "".join(c["choices"][0]["text"] for c in chunks) == w["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == w["choices"][0]["finish_reason"]


def test_stop_sequences_end_a_sequence_at_the_step_that_completes_them(static, iteration):
    full = static.run_batch([static.parse("completions", bodies()[4])])[0]["choices"][0]["text"]
    stop = full[10:13]
    body = {**bodies()[4], "stop": stop}
    want = static.run_batch([static.parse("completions", body)])[0]
    got = iteration.run_batch([iteration.parse("completions", body)])[0]
    assert got["choices"][0]["text"] == want["choices"][0]["text"] == full[: full.find(stop)]
    assert got["choices"][0]["finish_reason"] == "stop"
    # It stopped generating there, where the static path ran on to max_tokens.
    assert got["usage"]["completion_tokens"] < want["usage"]["completion_tokens"]


def test_a_request_arriving_during_a_long_generation_joins_at_the_next_step(iteration):
    lm = iteration.lm
    sched = GenerationScheduler(SlowSteps(lm.model, step_s=0.005), lm.tokenizer, max_running=4)
    try:
        long = sched.submit(seq(lm, "Once", 200))
        wait_for_tokens(long, 10)
        short = sched.submit(seq(lm, "GPU", 5))
        text, end = sched.result(short)
        tokens_of_long_when_short_ended = len(long.ids or [None] * 200)
        assert end.completion_tokens == 5 and end.reason == "length"
        # Five decode steps and one prefill later, not after the long generation's 200.
        assert tokens_of_long_when_short_ended < 40
        assert sched.result(long)[1].completion_tokens == 200
        # The short one's text is what it gets alone.
        alone = iteration.run_batch([iteration.parse("completions", {"prompt": "GPU", "max_tokens": 5, "temperature": 0})])
        assert text == alone[0]["choices"][0]["text"]
    finally:
        sched.close()


def test_a_client_that_leaves_frees_its_sequence_at_the_next_step(iteration):
    lm = iteration.lm
    sched = GenerationScheduler(SlowSteps(lm.model, step_s=0.005), lm.tokenizer, max_running=4)
    try:
        cancel = threading.Event()
        leaving = sched.submit(seq(lm, "Once", 10_000, incremental=True))
        wait_for_tokens(leaving, 1)
        cancel.set()
        assert sched.next_event(leaving, cancel) == Finished("cancelled", len(leaving.ids or ()))
        deadline = time.monotonic() + 5
        while sched.running and time.monotonic() < deadline:
            time.sleep(0.002)
        assert sched.running == 0
        assert leaving.cancelled and len(leaving.ids) < 1000
        # The batch's cache went with it: a new request starts from an empty batch.
        assert sched._cache is None
    finally:
        sched.close()


def test_the_running_set_is_bounded_and_the_rest_wait_their_turn(iteration, static):
    lm = iteration.lm
    seen = []
    sched = GenerationScheduler(lm.model, lm.tokenizer, max_running=2, on_step=lambda r, w: seen.append((r, w)))
    try:
        seqs = [sched.submit(seq(lm, p, m)) for p, m in zip(PROMPTS, MAX_TOKENS)]
        texts = [sched.result(s)[0] for s in seqs]
    finally:
        sched.close()
    assert max(r for r, _ in seen) == 2 and max(w for _, w in seen) >= 1
    want = static.run_batch([static.parse("completions", b) for b in bodies()])
    assert texts == [w["choices"][0]["text"] for w in want]


def test_a_seed_decides_a_sampled_text_whoever_shares_the_batch(iteration):
    body = {"prompt": "Once upon a time", "max_tokens": 15, "temperature": 1.0, "top_p": 0.9, "seed": 5}
    alone = iteration.run_batch([iteration.parse("completions", body)])[0]["choices"][0]["text"]
    crowd = iteration.run_batch(
        [iteration.parse("completions", {**body, "prompt": p, "seed": i}) for i, p in enumerate(PROMPTS)]
        + [iteration.parse("completions", body)]
    )
    assert crowd[-1]["choices"][0]["text"] == alone
    assert len({c["choices"][0]["text"] for c in crowd}) > 1


def test_a_failing_step_fails_its_requests_and_the_scheduler_goes_on(iteration):
    lm = iteration.lm

    class Failing(SlowSteps):
        def __call__(self, **kw):
            if self.hang.is_set():
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            return self.model(**kw)

    model = Failing(lm.model, 0.0)
    sched = GenerationScheduler(model, lm.tokenizer, max_running=4)
    try:
        model.hang.set()
        with pytest.raises(RuntimeError, match="illegal memory access"):
            sched.result(sched.submit(seq(lm, "Once", 5)))
        model.hang.clear()
        text, end = sched.result(sched.submit(seq(lm, "Once", 5)))
        assert end.completion_tokens == 5
    finally:
        sched.close()


def test_progress_is_a_decode_step_and_a_hung_step_shows_none(iteration):
    lm = iteration.lm
    model = SlowSteps(lm.model, step_s=0.002)
    sched = GenerationScheduler(model, lm.tokenizer, max_running=4)
    try:
        running = sched.submit(seq(lm, "Once", 100))
        wait_for_tokens(running, 5)
        model.hang.set()
        time.sleep(0.3)
        stuck_at = sched.last_step_s
        time.sleep(0.3)
        assert sched.last_step_s == stuck_at  # no step finished while it hung
        model.released.set()
        model.hang.clear()
        sched.result(running)
        assert sched.last_step_s > stuck_at
    finally:
        sched.close()


def test_a_closed_or_dead_scheduler_answers_instead_of_hanging(iteration):
    lm = iteration.lm
    sched = GenerationScheduler(lm.model, lm.tokenizer, max_running=1)
    sched.close()
    with pytest.raises(RuntimeError, match="stopped"):
        sched.submit(seq(lm, "Once", 5))


def test_supports_refuses_a_model_without_a_dynamic_cache():
    import torch

    class NoCache(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, input_ids, use_cache=True):
            return {"logits": torch.zeros(1, 2, 3)}

    assert "not a DynamicCache" in supports(NoCache())
