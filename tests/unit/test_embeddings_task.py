"""The embeddings task on the real all-MiniLM-L6-v2 weights (no Ray)."""

import base64

import numpy as np
import pytest

from deployments.embeddings import EmbeddingsTask
from serving import ModelDeployment, ModelSource, QueueSpec
from serving.errors import InvalidRequest, ModelNotFound
from tests.conftest import MINILM


@pytest.fixture(scope="module")
def task():
    spec = ModelDeployment(
        name="minilm",
        task="embeddings",
        model=ModelSource(path=MINILM, served_name="all-minilm-l6-v2"),
        queue=QueueSpec(max_inputs_per_request=4),
    )
    return EmbeddingsTask(spec)


def embed(task, texts):
    out = task.run_batch([task.parse("embeddings", {"input": texts})])[0]
    return np.array([d["embedding"] for d in out["data"]])


def test_vectors_are_384d_unit_length(task):
    v = embed(task, ["hello world", "another sentence"])
    assert v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_paraphrase_ranks_above_unrelated(task):
    a, b, c = embed(task, ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply."])
    assert a @ b > a @ c + 0.3


def test_matches_sentence_transformers_reference(task):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(task.model_dir), device="cpu")
    texts = ["short", "a considerably longer sentence, so that padding matters in the batch"]
    expected = ref.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(embed(task, texts), expected, atol=1e-5)


def test_batch_of_requests_equals_one_by_one(task):
    items = [task.parse("embeddings", {"input": t}) for t in (["x y z"], ["a", "b c"], "q")]
    batched = task.run_batch(items)
    for item, out in zip(items, batched):
        alone = task.run_batch([item])[0]
        np.testing.assert_allclose(
            [d["embedding"] for d in out["data"]], [d["embedding"] for d in alone["data"]], atol=1e-5
        )
    assert [len(o["data"]) for o in batched] == [1, 2, 1]


def test_base64_encoding_decodes_to_the_float_vector(task):
    item = task.parse("embeddings", {"input": "hello", "encoding_format": "base64"})
    b64 = task.run_batch([item])[0]["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_allclose(decoded, embed(task, ["hello"])[0], atol=1e-6)


def test_usage_counts_tokens(task):
    out = task.run_batch([task.parse("embeddings", {"input": ["hello world"]})])[0]
    assert out["usage"] == {"prompt_tokens": 4, "total_tokens": 4}  # [CLS] hello world [SEP]
    assert out["model"] == "all-minilm-l6-v2" and out["object"] == "list"


@pytest.mark.parametrize(
    "body,code,param",
    [
        ({"input": []}, "empty_input", "input"),
        ({"input": ["ok", "  "]}, "empty_input", "input[1]"),
        ({"input": ["a"] * 5}, "too_many_inputs", "input"),
        ({"input": "word " * 600}, "input_too_long", "input[0]"),
        ({"input": 3}, "invalid_string_type", "input"),
        ({"input": "a", "dimensions": 128}, "unsupported_dimensions", "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "invalid_literal_error", "encoding_format"),
        ({"inputs": "a"}, "invalid_missing", "input"),
    ],
)
def test_bad_requests(task, body, code, param):
    with pytest.raises(InvalidRequest) as ei:
        task.parse("embeddings", body)
    assert ei.value.code == code and ei.value.param == param


def test_wrong_model_name(task):
    with pytest.raises(ModelNotFound, match="serves 'all-minilm-l6-v2'"):
        task.parse("embeddings", {"input": "a", "model": "gpt-4"})


def test_missing_package_is_a_clear_error():
    spec = ModelDeployment(name="m", task="embeddings", model=ModelSource(path="package://no_such_pkg_xyz"))
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        EmbeddingsTask(spec)
