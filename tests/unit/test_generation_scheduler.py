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


class Record:
    """A step observer that keeps what the scheduler tells it."""

    def __init__(self):
        self.firsts, self.gaps, self.kv, self.states = [], [], [], []

    def first_tokens(self, ttfts_s):
        self.firsts += ttfts_s

    def step(self, running, waiting, kv_cache_bytes, token_gaps_s):
        self.gaps += token_gaps_s
        self.kv.append(kv_cache_bytes)
        self.states.append((running, waiting))


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
    record = Record()
    sched = GenerationScheduler(lm.model, lm.tokenizer, max_running=2, observer=record)
    try:
        seqs = [sched.submit(seq(lm, p, m)) for p, m in zip(PROMPTS, MAX_TOKENS)]
        texts = [sched.result(s)[0] for s in seqs]
    finally:
        sched.close()
    assert max(r for r, _ in record.states) == 2 and max(w for _, w in record.states) >= 1
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


def test_the_observer_gets_times_to_first_token_gaps_between_tokens_and_the_kv_cache(iteration):
    lm = iteration.lm
    clock = {"now": 0.0}

    def tick():
        clock["now"] += 0.01  # every clock read is 10 ms later: a fake, monotonic clock
        return clock["now"]

    seen = Record()
    sched = GenerationScheduler(lm.model, lm.tokenizer, max_running=4, clock=tick, observer=seen)
    try:
        seqs = [sched.submit(seq(lm, p, 6)) for p in ("Once", "GPU")]
        ends = [sched.result(s)[1] for s in seqs]
    finally:
        sched.close()
    made = sum(e.completion_tokens for e in ends)
    # One first token per sequence, one gap for each further token: every output token is counted once.
    assert len(seen.firsts) == 2 and len(seen.firsts) + len(seen.gaps) == made
    assert all(t > 0 for t in seen.firsts + seen.gaps)
    assert max(seen.kv) > 0 and seen.kv[-1] == 0  # held while running, freed when all ended
    assert seen.states[-1] == (0, 0)


# -- memory: the KV cache's size, admission against a budget, out-of-memory errors by cause ------------


class OomWhen(SlowSteps):
    """Raises torch's out-of-memory error, as CUDA does, when ``when(rows, length)`` holds for a forward pass."""

    def __init__(self, model, when):
        super().__init__(model, 0.0)
        self.when = when

    def __call__(self, **kw):
        import torch

        rows, length = kw["attention_mask"].shape
        if self.when(rows, length):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return self.model(**kw)


def test_kv_bytes_per_token_from_the_config_is_what_the_cache_holds(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deployments._scheduler import kv_bytes_per_token
    from serving.testing import make_random_llama, make_tiny_causal_lm

    gqa = make_random_llama(tmp_path / "llama", hidden_size=64, layers=3, heads=4, kv_heads=2, intermediate_size=128)
    for path in (gqa, make_tiny_causal_lm(tmp_path / "gpt2")):
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        per_token = kv_bytes_per_token(model.config, next(model.parameters()).element_size())
        seen = Record()
        sched = GenerationScheduler(model, tok, max_running=2, observer=seen, kv_bytes_per_token=per_token)
        try:
            prompt = tok("Once upon a time")["input_ids"]
            sched.result(sched.submit(Sequence(prompt, 5, 0.0, 1.0, [], incremental=False)))
        finally:
            sched.close()
        # The first iteration prefills the prompt and steps once (feeding the first token); each step adds one.
        assert seen.kv[:3] == [(len(prompt) + k) * per_token for k in (1, 2, 3)]


def budgeted(iteration, tokens, model=None):
    lm = iteration.lm
    from deployments._scheduler import kv_bytes_per_token

    per_token = kv_bytes_per_token(lm.model.config, 4)
    return GenerationScheduler(
        model or lm.model, lm.tokenizer, max_running=8, kv_bytes_per_token=per_token, kv_budget_bytes=tokens * per_token
    )


def test_a_request_that_can_never_fit_the_kv_budget_is_a_413_at_parse(tiny_lm_dir):
    from serving.errors import RequestTooLargeForDevice, http_status_for

    task = make_task(tiny_lm_dir, "iteration", kv_cache_bytes=40 * 2 * 2 * 64 * 4)  # 40 tokens of KV
    try:
        with pytest.raises(RequestTooLargeForDevice) as ei:
            task.parse("completions", {"prompt": "Once upon a time", "max_tokens": 60})
        assert http_status_for(ei.value) == 413 and "KV-cache budget" in str(ei.value) and ei.value.param == "max_tokens"
        assert task.run_batch([task.parse("completions", {"prompt": "Once", "max_tokens": 20})])[0]["choices"]
    finally:
        task.scheduler.close()


def test_a_request_that_cannot_fit_now_is_a_429_with_the_time_until_room(iteration):
    from serving.errors import Overloaded, http_headers_for, http_status_for

    lm = iteration.lm
    sched = budgeted(iteration, 100, SlowSteps(lm.model, step_s=0.01))
    try:
        first = sched.submit(seq(lm, "Once", 55))
        wait_for_tokens(first, 5)
        with pytest.raises(Overloaded) as ei:
            sched.check_fits(len(lm.encode("GPU")) + 55)
        assert http_status_for(ei.value) == 429 and int(http_headers_for(ei.value)["Retry-After"]) >= 1
        assert ei.value.code == "kv_cache_full"
        sched.result(first)
        sched.check_fits(len(lm.encode("GPU")) + 55)  # room again
    finally:
        sched.close()


def test_waiting_sequences_join_only_while_the_padded_batch_fits_the_budget(iteration, static):
    lm = iteration.lm
    sched = budgeted(iteration, 2 * 45)
    seen = Record()
    sched.observer = seen
    try:
        seqs = [sched.submit(seq(lm, p, 40)) for p in ("Once", "GPU", "serving models")]
        texts = [sched.result(s)[0] for s in seqs]
    finally:
        sched.close()
    assert max(r for r, _ in seen.states) == 2 and max(seen.kv) <= sched.kv_budget_bytes
    want = static.run_batch([static.parse("completions", {"prompt": p, "max_tokens": 40, "temperature": 0}) for p in ("Once", "GPU", "serving models")])
    assert texts == [w["choices"][0]["text"] for w in want]


def test_an_oom_in_a_batch_preempts_it_and_every_request_still_gets_its_own_text(iteration, static):
    lm = iteration.lm
    model = OomWhen(lm.model, lambda rows, length: rows > 2)
    seen = Record()
    sched = GenerationScheduler(model, lm.tokenizer, max_running=8, observer=seen)
    try:
        streamed = sched.submit(seq(lm, PROMPTS[0], MAX_TOKENS[0], incremental=True))
        rest = [sched.submit(seq(lm, p, m)) for p, m in zip(PROMPTS[1:], MAX_TOKENS[1:])]
        pieces = []
        while True:
            ev = sched.next_event(streamed)
            if isinstance(ev, Finished):
                break
            pieces.append(ev)
        texts = ["".join(pieces)] + [sched.result(s)[0] for s in rest]
    finally:
        sched.close()
    want = static.run_batch([static.parse("completions", b) for b in bodies()])
    assert texts == [w["choices"][0]["text"] for w in want]
    assert set(sched.oom_log.counts) == {"preempted"} and sched.oom_log.counts["preempted"] >= 1


def test_a_lone_request_too_large_for_the_device_is_a_413_and_not_counted_against_the_replica(iteration):
    from serving.errors import RequestTooLargeForDevice, http_status_for

    lm = iteration.lm
    sched = GenerationScheduler(OomWhen(lm.model, lambda rows, length: length > 30), lm.tokenizer, max_running=4)
    try:
        small = sched.result(sched.submit(seq(lm, "Once", 10)))
        assert small[1].completion_tokens == 10
        with pytest.raises(RequestTooLargeForDevice) as ei:
            sched.result(sched.submit(seq(lm, "Once", 60)))
        assert http_status_for(ei.value) == 413 and "alone, twice" in str(ei.value)
        assert sched.oom_log.counts == {"too_large": 1} and sched.oom_log.recent() == 0
        # The replica goes on serving.
        assert sched.result(sched.submit(seq(lm, "GPU", 5)))[1].completion_tokens == 5
    finally:
        sched.close()


def test_ooms_on_requests_no_larger_than_served_ones_are_the_devices_and_fail_its_health(tiny_lm_dir):
    from serving import MemorySpec
    from serving.errors import ModelNotReady, http_status_for

    spec = ModelDeployment(
        name="tiny",
        task="text_generation",
        model=ModelSource(path=str(tiny_lm_dir)),
        generation=GenerationSpec(scheduler="iteration"),
        memory=MemorySpec(max_ooms_in_window=1),
    )
    task = TextGenerationTask(spec)
    try:
        body = {"prompt": "Once", "max_tokens": 8, "temperature": 0}
        assert task.run_batch([task.parse("completions", body)])[0]["usage"]["completion_tokens"] == 8
        broken = OomWhen(task.scheduler.model, lambda rows, length: True)
        task.scheduler.model = broken
        for _ in range(2):
            with pytest.raises(ModelNotReady) as ei:
                task.run_batch([task.parse("completions", body)])
            assert http_status_for(ei.value) == 503 and ei.value.code == "device_out_of_memory"
        assert task.oom_log.counts["persistent"] == 2 and task.scheduler.oom_log is task.oom_log
        with pytest.raises(RuntimeError, match="2 out-of-memory errors .* the device, not the requests"):
            task.health()
    finally:
        task.scheduler.close()


def test_warm_up_covers_the_longest_request_the_kv_budget_holds_not_the_context(tiny_lm_dir):
    # A budget of 100 tokens on a 256-token model: warming up at the full context would be refused (413)
    # and fail the replica's start.
    task = make_task(tiny_lm_dir, "iteration", kv_cache_bytes=100 * 1024)
    try:
        assert task.scheduler.kv_bytes_per_token == 1024
        assert task.max_input_tokens_for_warmup() == 96
        item = task.warmup_items([task.synthetic_input(task.max_input_tokens_for_warmup())])[0]
        assert 90 <= item.prompt_tokens <= 96
        out = task.run_batch([item, item])  # the batch's second row waits for room in the budget
        assert [o["usage"]["completion_tokens"] for o in out] == [4, 4]
    finally:
        task.scheduler.close()


# -- chunked prefill -------------------------------------------------------------------------------


def chunked(task, chunk, observer=None, model=None):
    return GenerationScheduler(model or task.model, task.lm.tokenizer, 16, observer=observer, prefill_chunk_tokens=chunk)


def test_a_chunked_prefill_gives_the_same_greedy_text_as_the_whole_prompt(iteration):
    prompts = [" ".join(["word"] * n) + f" tail {n}" for n in (5, 20, 40)]  # 26, 87 and 167 tokens
    whole = [iteration.scheduler.result(iteration.scheduler.submit(seq(iteration.lm, p, 12)))[0] for p in prompts]
    sched = chunked(iteration, 16)
    try:
        got = [sched.result(sched.submit(seq(iteration.lm, p, 12)))[0] for p in prompts]
        # Together too: a long prompt in chunks while short ones join whole and decode.
        together = [sched.submit(seq(iteration.lm, p, 12)) for p in prompts]
        assert [sched.result(s)[0] for s in together] == whole
    finally:
        sched.close()
    assert got == whole


def test_a_short_request_behind_a_long_prompt_gets_its_first_token_before_the_long_prompt_is_read(iteration):
    """Each forward pass takes 50 ms: a 150-token prompt in 8-token chunks is 19 passes; the short
    request that arrives just after it is prefilled whole in the next iteration."""
    slow = SlowSteps(iteration.model, 0.05)
    sched = chunked(iteration, 8, model=slow)
    try:
        long = sched.submit(seq(iteration.lm, " ".join(["long"] * 50), 4))
        time.sleep(0.12)  # the long prompt's first chunks are running
        short = sched.submit(seq(iteration.lm, "short", 4))
        sched.result(short)
        sched.result(long)
    finally:
        sched.close()
    assert short.first_token_s < long.first_token_s
    # It waited for about one chunk, not for the 25 of the long prompt.
    assert short.first_token_s - short.submitted_s < (long.first_token_s - long.submitted_s) / 3


def test_a_client_that_leaves_during_a_chunked_prefill_frees_it(iteration):
    record = Record()
    slow = SlowSteps(iteration.model, 0.02)
    sched = chunked(iteration, 8, observer=record, model=slow)
    try:
        long = sched.submit(seq(iteration.lm, " ".join(["long"] * 50), 50))
        deadline = time.monotonic() + 10
        while sched.kv_cache_bytes() == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sched.kv_cache_bytes() > 0 and sched.running == 1  # counted while it is being read
        long.cancel()
        ev = sched.result(long)[1]
        assert ev == Finished("cancelled", 0)
        deadline = time.monotonic() + 10
        while (sched.running or sched.kv_cache_bytes()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.running == 0 and sched.kv_cache_bytes() == 0
    finally:
        sched.close()


def test_an_oom_while_a_long_prompt_is_read_in_chunks_preempts_it_with_the_batch_and_the_texts_stay(iteration):
    """The first time the cache reaches 100 columns (a chunk of the long prompt, with short rows decoding)
    the device runs out of memory: everything goes back in line, and every text is its own."""
    lm = iteration.lm
    fired = []

    def once_at_100(rows, length):
        if length >= 100 and not fired:
            fired.append((rows, length))
            return True
        return False

    prompts = ["Hello there", " ".join(["word"] * 40) + " end", "A short one"]
    want = [iteration.scheduler.result(iteration.scheduler.submit(seq(lm, p, 10)))[0] for p in prompts]
    seen = Record()
    sched = GenerationScheduler(OomWhen(lm.model, once_at_100), lm.tokenizer, 8, observer=seen, prefill_chunk_tokens=16)
    try:
        got = [sched.submit(seq(lm, p, 10)) for p in prompts]
        texts = [sched.result(s)[0] for s in got]
    finally:
        sched.close()
    assert fired and sched.oom_log.counts == {"preempted": 1}
    assert texts == want


def test_a_stream_that_fell_behind_gets_the_queued_text_in_one_event_and_nothing_is_lost(iteration):
    lm = iteration.lm
    sched = iteration.scheduler
    s = sched.submit(seq(lm, "Once upon a time", 20, incremental=True))
    # Read nothing until it has finished: every delta is queued, as for a consumer far behind.
    deadline = time.monotonic() + 30
    while s.ids is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.events.qsize() > 2
    first = sched.next_event(s, coalesce=True)
    last = sched.next_event(s, coalesce=True)
    # The whole text in one event; the Finished kept for the next call.
    assert isinstance(first, str) and first == s.text
    assert isinstance(last, Finished)
    # Without coalescing the same text comes a delta at a time.
    t = sched.submit(seq(lm, "Once upon a time", 20, incremental=True))
    pieces = []
    while not isinstance(ev := sched.next_event(t), Finished):
        pieces.append(ev)
    assert "".join(pieces) == first and len(pieces) > 1


# -- the static path (models the scheduler cannot run): streams under the same guard as batches -------------


class CountForwards:
    """Wraps a model's forward: counts the passes running at once (each made slow enough to overlap), and
    raises torch's out-of-memory error, as CUDA does, while ``oom_left`` is above 0."""

    def __init__(self, model, step_s=0.01):
        self.model, self.forward, self.step_s = model, model.forward, step_s
        self.lock, self.now, self.most, self.oom_left, self.calls = threading.Lock(), 0, 0, 0, 0

    def __call__(self, *args, **kw):
        import torch

        with self.lock:
            self.calls += 1
            self.now += 1
            self.most = max(self.most, self.now)
            oom = self.oom_left > 0
            self.oom_left -= oom
        try:
            if oom:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
            time.sleep(self.step_s)
            return self.forward(*args, **kw)
        finally:
            with self.lock:
                self.now -= 1


@pytest.fixture
def static_counted(tiny_lm_dir):
    task = make_task(tiny_lm_dir, "static")
    counted = CountForwards(task.lm.model)
    task.lm.model.forward = counted
    return task, counted


def test_static_streams_and_batches_share_the_device_one_generation_at_a_time(static_counted):
    # Issue 15: on the static path each stream ran a generate of its own, beside the model thread's batches
    # and the other streams, outside the memory guard: N streams were N generations on the device at once.
    task, counted = static_counted
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    want = task.run_batch([task.parse("completions", body)])[0]["choices"][0]["text"]
    texts, errors = [], []

    def streamed():
        try:
            chunks = task.stream(task.parse("completions", {**body, "stream": True}), threading.Event())
            texts.append("".join(c["choices"][0]["text"] for c in chunks))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def batched():
        texts.append(task.run_batch([task.parse("completions", body)])[0]["choices"][0]["text"])

    threads = [threading.Thread(target=f) for f in (streamed, streamed, streamed, batched)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and texts == [want] * 4
    assert counted.most == 1


def test_an_oom_in_a_static_stream_is_freed_retried_once_and_classified_in_the_replicas_log(static_counted):
    from serving.errors import RequestTooLargeForDevice, http_status_for

    task, counted = static_counted
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
    want = task.run_batch([task.parse("completions", {**body, "stream": False})])[0]["choices"][0]["text"]

    def stream_text(**over):
        chunks = task.stream(task.parse("completions", {**body, **over}), threading.Event())
        return "".join(c["choices"][0]["text"] for c in chunks)

    counted.oom_left = 1  # a passing failure: once more on the freed cache, and the client sees only its text
    assert stream_text() == want
    assert sum(task.oom_log.counts.values()) == 0
    counted.oom_left = 2  # alone, twice, and larger than anything that completed here: 413, not the device's fault
    with pytest.raises(RequestTooLargeForDevice) as ei:
        stream_text(prompt="Once upon a time " * 8)
    assert http_status_for(ei.value) == 413 and "alone, twice" in str(ei.value)
    assert task.oom_log.counts == {"too_large": 1} and task.oom_log.recent() == 0
    counted.oom_left = 2  # as large as one that completed: the device's trouble, counted for its health
    with pytest.raises(Exception) as ei:
        stream_text()
    assert http_status_for(ei.value) == 503 and ei.value.code == "device_out_of_memory"
    assert task.oom_log.counts["persistent"] == 1 and task.oom_log.recent() == 1
    assert stream_text() == want  # and the replica goes on serving


def test_a_static_stream_waits_for_the_device_as_long_as_it_takes_and_leaves_unrun_if_its_client_goes(static_counted, monkeypatch):
    import deployments.text_generation as tg

    task, counted = static_counted
    monkeypatch.setattr(tg, "STREAM_POLL_S", 0.1)
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
    want = task.run_batch([task.parse("completions", {**body, "stream": False})])[0]["choices"][0]["text"]
    counted.calls = 0
    assert "".join(c["choices"][0]["text"] for c in task.stream(task.parse("completions", body), threading.Event())) == want
    one_stream = counted.calls
    counted.calls = 0
    with task.lm.device_lock:  # a long generation holds the device, longer than the consumer's poll
        out, errors = [], []

        def streamed():
            try:
                chunks = task.stream(task.parse("completions", body), threading.Event())
                out.append("".join(c["choices"][0]["text"] for c in chunks))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=streamed)
        t.start()
        time.sleep(0.5)
        gone = threading.Event()
        gen = task.stream(task.parse("completions", body), gone)
        waiter = threading.Thread(target=lambda: list(gen))
        waiter.start()
        time.sleep(0.3)
        gone.set()  # this client leaves while it waits for the device
    t.join(30)
    waiter.join(30)
    assert not errors and out == [want]
    assert counted.calls == one_stream, "the stream whose client left while it waited ran no forward pass"


def test_a_decode_step_writes_its_token_into_the_cache_in_place_instead_of_copying_the_whole_cache(iteration):
    # transformers' DynamicCache concatenates every layer's keys and values at every step: a copy of the whole
    # cache per token (40 % of a step's time at 10 rows of 500 tokens, measured). The batch's cache keeps room.
    lm = iteration.lm

    class Storages(Record):
        def __init__(self):
            super().__init__()
            self.ptrs = []

        def step(self, running, waiting, kv_cache_bytes, token_gaps_s):
            super().step(running, waiting, kv_cache_bytes, token_gaps_s)
            if sched._cache is not None:
                layer = sched._cache.layers[0]
                self.ptrs.append(layer.keys.untyped_storage().data_ptr())
                self.room.append(layer.keys.untyped_storage().nbytes() // (layer.keys.nbytes // layer.keys.shape[-2]))

    seen = Storages()
    seen.room = []
    sched = GenerationScheduler(lm.model, lm.tokenizer, max_running=4, observer=seen)
    prompt = lm.encode("Once upon a time")
    try:
        text = sched.result(sched.submit(seq(lm, "Once upon a time", 60)))[0]
    finally:
        sched.close()
    assert len(seen.ptrs) >= 50 and len(set(seen.ptrs)) <= 4, "a new cache tensor at (almost) every step"
    # The room never reaches past what the sequence can fill: its prompt plus max_tokens.
    assert max(seen.room) <= len(prompt) + 60
    assert text == iteration.run_batch([iteration.parse("completions", {"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0})])[0]["choices"][0]["text"]
