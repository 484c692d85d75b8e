"""The OpenAI surface as OpenAI's own Python client sees it: chat and completions, sync and async, streamed
and not, on a tiny random model served by real Ray Serve."""

import asyncio

import openai
import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def base_url(generation_client):
    return str(generation_client.base_url).rstrip("/") + "/v1"


@pytest.fixture(scope="module")
def client(base_url):
    # No retries: a test must see the first answer, not a retried one.
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_chat_non_streamed(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_greedy_equals_non_streamed_with_usage(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_completions_sync_streamed_and_not(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens <= 10
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
        )
    )
    assert streamed == full.choices[0].text


def test_async_chat_and_completions_streamed_and_not(base_url, client):
    async def main():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as c:
            chat = await c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, seed=3)
            pieces = []
            async for chunk in await c.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stream=True
            ):
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
            comp = await c.completions.create(model="tiny", prompt="GPU", max_tokens=6, temperature=0)
            streamed = [
                x.choices[0].text
                async for x in await c.completions.create(model="tiny", prompt="GPU", max_tokens=6, temperature=0, stream=True)
            ]
            return chat, "".join(pieces), comp, "".join(streamed)

    chat, chat_streamed, comp, comp_streamed = asyncio.run(main())
    assert chat_streamed == chat.choices[0].message.content
    assert comp_streamed == comp.choices[0].text
    # The async client and the sync one get the same greedy answer.
    sync = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert sync.choices[0].message.content == chat.choices[0].message.content


def test_a_seed_repeats_a_sampled_answer(client):
    def ask(seed):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    assert ask(11) == ask(11)


@pytest.mark.parametrize(
    "call,error,code",
    [
        (lambda c: c.chat.completions.create(model="tiny", messages=[]), openai.BadRequestError, "invalid_too_short"),
        (
            lambda c: c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10_000),
            openai.BadRequestError,
            "context_length_exceeded",
        ),
        (
            lambda c: c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, max_completion_tokens=5),
            openai.BadRequestError,
            "invalid_value_error",
        ),
        (lambda c: c.chat.completions.create(model="other", messages=MESSAGES), openai.NotFoundError, "model_not_found"),
        (
            lambda c: c.completions.create(model="tiny", prompt="a", max_tokens=2, stream_options={"include_usage": True}),
            openai.BadRequestError,
            "invalid_value_error",
        ),
    ],
)
def test_bad_input_is_the_clients_typed_error_with_openais_code(client, call, error, code):
    with pytest.raises(error) as ei:
        call(client)
    assert ei.value.code == code, ei.value.body
    assert ei.value.body["message"]


def test_gpuserves_own_clients_chat_matches_openais(base_url, client):
    from serving.client import AsyncClient, Client

    ours_url = base_url.removesuffix("/v1")
    want = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    with Client(ours_url) as c:
        got = c.chat(MESSAGES, max_tokens=6, temperature=0)

    async def via_async():
        async with AsyncClient(ours_url) as a:
            return await a.chat(MESSAGES, max_tokens=6, temperature=0)

    for body in (got, asyncio.run(via_async())):
        assert body["choices"][0]["message"]["content"] == want.choices[0].message.content
