"""The text-generation task on a tiny random model loaded via from_pretrained (no Ray)."""

import threading

import pytest

from deployments._scheduler import HeldBack, cut_at_stop, safe_prefix_len
from deployments.text_generation import TextGenerationTask
from serving import ModelDeployment, ModelSource
from serving.errors import InvalidRequest


@pytest.fixture(scope="module")
def task(tiny_lm_dir):
    spec = ModelDeployment(name="tiny", task="text_generation", model=ModelSource(path=str(tiny_lm_dir)))
    return TextGenerationTask(spec)


def complete(task, **body):
    return task.run_batch([task.parse("completions", {"prompt": "Once upon a time", **body})])[0]


def stream_text(task, **body):
    item = task.parse("completions", {"prompt": "Once upon a time", "stream": True, **body})
    chunks = list(task.stream(item, threading.Event()))
    return "".join(c["choices"][0]["text"] for c in chunks), chunks


def test_loads_through_from_pretrained(task, tiny_lm_dir):
    assert task.model_dir == tiny_lm_dir.resolve()
    assert task.describe()["context_tokens"] == 256


def test_greedy_is_deterministic_and_respects_max_tokens(task):
    a = complete(task, max_tokens=6, temperature=0)
    b = complete(task, max_tokens=6, temperature=0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] <= 6
    assert a["choices"][0]["finish_reason"] in ("length", "stop")
    assert a["object"] == "text_completion" and a["model"] == "tiny"


def test_batch_mixes_sampling_settings_and_prompt_lists(task):
    items = [
        task.parse("completions", {"prompt": ["Once upon a time", "GPU"], "max_tokens": 4, "temperature": 0}),
        task.parse("completions", {"prompt": "The quick", "max_tokens": 3, "temperature": 0.8}),
    ]
    out = task.run_batch(items)
    assert [len(o["choices"]) for o in out] == [2, 1]
    assert [c["index"] for c in out[0]["choices"]] == [0, 1]
    # A greedy row in a batch equals the same prompt alone (left padding is correct).
    alone = complete(task, max_tokens=4, temperature=0)
    assert out[0]["choices"][0]["text"] == alone["choices"][0]["text"]


def test_stop_sequence_cuts_the_text(task):
    full = complete(task, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert len(full) >= 3
    stop = full[2:4]
    out = complete(task, max_tokens=12, temperature=0, stop=[stop])["choices"][0]
    assert out["text"] == full[: full.find(stop)]
    assert out["finish_reason"] == "stop"


def test_stream_equals_non_stream_for_greedy(task):
    full = complete(task, max_tokens=10, temperature=0)["choices"][0]
    text, chunks = stream_text(task, max_tokens=10, temperature=0)
    assert text == full["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_stream_never_shows_text_a_stop_removes(task):
    full = complete(task, max_tokens=12, temperature=0)["choices"][0]["text"]
    stop = full[3:6]
    text, chunks = stream_text(task, max_tokens=12, temperature=0, stop=stop)
    assert text == full[: full.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_cancel_stops_generation_early(task):
    item = task.parse("completions", {"prompt": "Once", "stream": True, "max_tokens": 200, "temperature": 0})
    cancel = threading.Event()
    gen = task.stream(item, cancel)
    next(gen)
    cancel.set()
    rest = list(gen)
    assert len(rest) < 150


def test_cancel_reaches_generate(task):
    # The tiny model emits no spaces, so its streamer yields only at the end and the test above
    # cannot tell a working cancel from a broken one; the generated-token count can.
    cancel, stats = threading.Event(), {}
    cancel.set()
    list(task.lm.stream(task.lm.encode("Once"), 200, 0.0, 1.0, cancel, stats))
    assert stats["new_tokens"] <= 2
    full = {}
    list(task.lm.stream(task.lm.encode("Once"), 20, 0.0, 1.0, threading.Event(), full))
    assert full["new_tokens"] == 20 or full["ended_on_eos"]


@pytest.mark.parametrize(
    "body,code",
    [
        ({"prompt": ""}, "empty_input"),
        ({"prompt": []}, "empty_input"),
        ({"prompt": ["a", "b"], "stream": True}, "unsupported_stream"),
        ({"prompt": "a", "max_tokens": 300}, "context_length_exceeded"),
        ({"prompt": "word " * 400}, "context_length_exceeded"),
        ({"prompt": "a", "temperature": 3}, "invalid_less_than_equal"),
        ({"prompt": "a", "stop": ["x"] * 5}, "invalid_value_error"),
        ({"prompt": "a", "n": 2}, "invalid_less_than_equal"),
        ({"prompt": "a", "stream": "yes"}, "invalid_bool_type"),
    ],
)
def test_bad_requests(task, body, code):
    with pytest.raises(InvalidRequest) as ei:
        task.parse("completions", body)
    assert ei.value.code == code


def chat(task, messages=None, **body):
    messages = messages or [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}]
    return task.parse("chat/completions", {"messages": messages, **body})


def test_chat_renders_the_messages_with_the_tokenizers_template(task):
    item = chat(task, max_tokens=5, temperature=0)
    rendered = task.lm.tokenizer.decode(item.prompt_ids)
    assert rendered == "<system>Be brief.\n<user>Once upon a time\n<assistant>"
    # A developer message is a system message; a list of text parts is their concatenation.
    parts = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Once upon "}, {"type": "text", "text": "a time"}]}]
    assert chat(task, parts, max_tokens=5).prompt_ids == item.prompt_ids
    out = task.run_batch([item])[0]
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] == len(item.prompt_ids)
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    # The same greedy generation as the rendered text sent to /v1/completions.
    same = task.run_batch([task.parse("completions", {"prompt": rendered, "max_tokens": 5, "temperature": 0})])[0]
    assert choice["message"]["content"] == same["choices"][0]["text"]


def test_chat_defaults_to_the_rest_of_the_context_and_takes_either_token_limit(task):
    item = chat(task)
    assert item.max_tokens == task.max_positions - item.prompt_tokens
    assert chat(task, max_completion_tokens=7).max_tokens == 7
    assert chat(task, max_tokens=7, max_completion_tokens=7).max_tokens == 7
    with pytest.raises(InvalidRequest, match=r"max_tokens \(3\) and max_completion_tokens \(4\) disagree"):
        chat(task, max_tokens=3, max_completion_tokens=4)


def test_chat_stream_has_openais_chunk_shape_and_equals_the_answer(task):
    full = task.run_batch([chat(task, max_tokens=10, temperature=0)])[0]
    chunks = list(task.stream(chat(task, max_tokens=10, temperature=0, stream=True), threading.Event()))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": full["choices"][0]["finish_reason"], "logprobs": None}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_include_usage_ends_the_stream_with_the_usage(task, endpoint):
    body = {"max_tokens": 9, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat/completions":
        body["messages"] = [{"role": "user", "content": "Once upon a time"}]
    else:
        body["prompt"] = "Once upon a time"
    item = task.parse(endpoint, body)
    chunks = list(task.stream(item, threading.Event()))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    non_stream = task.run_batch([task.parse(endpoint, {**body, "stream": False, "stream_options": None})])[0]
    assert chunks[-1]["usage"] == non_stream["usage"]


def test_a_seed_decides_a_sampled_text_whoever_it_is_batched_with(task):
    def text(out):
        return out["choices"][0]["text"]

    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 42}
    alone = text(task.run_batch([task.parse("completions", body)])[0])
    batched = task.run_batch([task.parse("completions", {**body, "prompt": "GPU"}), task.parse("completions", body)])
    assert text(batched[1]) == alone
    other = {text(task.run_batch([task.parse("completions", {**body, "seed": s})])[0]) for s in range(1, 5)}
    assert other != {alone}
    streamed = "".join(c["choices"][0]["text"] for c in task.stream(task.parse("completions", {**body, "stream": True}), threading.Event()))
    assert streamed == alone


@pytest.mark.parametrize(
    "body,code,param",
    [
        ({"messages": []}, "invalid_too_short", "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_literal_error", "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "invalid_literal_error", "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}, "invalid_messages", "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "invalid_value_error", "stream_options"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"x": 1}}, "invalid_extra_forbidden", "stream_options.x"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "invalid_extra_forbidden", "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 300}, "context_length_exceeded", "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 300}]}, "context_length_exceeded", "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "seed": -1}, "invalid_greater_than_equal", "seed"),
    ],
)
def test_bad_chat_requests_name_the_field(task, body, code, param):
    with pytest.raises(InvalidRequest) as ei:
        task.parse("chat/completions", body)
    assert (ei.value.code, ei.value.param) == (code, param)


def test_a_model_without_a_chat_template_answers_chat_with_a_clear_400(tmp_path):
    from serving.errors import http_status_for
    from serving.testing import make_tiny_causal_lm

    spec = ModelDeployment(
        name="plain", task="text_generation",
        model=ModelSource(path=str(make_tiny_causal_lm(tmp_path, chat_template=None))),
    )
    plain = TextGenerationTask(spec)
    with pytest.raises(InvalidRequest) as ei:
        chat(plain)
    assert ei.value.code == "chat_template_missing" and http_status_for(ei.value) == 400
    assert "/v1/completions" in str(ei.value)
    assert plain.describe()["chat_template"] is False
    # Completions still work.
    assert plain.run_batch([plain.parse("completions", {"prompt": "a", "max_tokens": 2})])[0]["choices"]


def test_cut_at_stop_picks_the_earliest():
    assert cut_at_stop("abc END x STOP", ["STOP", "END"]) == ("abc ", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)


def test_safe_prefix_holds_back_a_partial_stop():
    assert safe_prefix_len("hello wor", ["world"]) == len("hello ")
    assert safe_prefix_len("hello", ["xyz"]) == 5
    assert safe_prefix_len("hello", []) == 5


def test_held_back_text_never_shows_what_a_stop_sequence_removes():
    held = HeldBack(["STOP"])
    assert held.add("hello ST") == ("hello ", False)
    assert held.add("O") == ("", False)
    assert held.add("P and more") == ("", True)
    assert held.text == "hello " and held.rest() == ""
    free = HeldBack(["STOP"])
    assert free.add("hi S") == ("hi ", False) and free.add("ay") == ("Say", False) and free.rest() == ""
