"""The `remote` backend: an existing OpenAI-compatible server that modelhost routes to but
never starts or stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import FAKE_WORKER, GatewayFactory, upstream_server


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    events = tmp_path_factory.mktemp("remote") / "ev"
    with upstream_server(FAKE_WORKER, "--events", str(events), api_key="remote-secret") as server:
        yield server.url + "/v1", events


def test_remote_model_is_routed_with_its_key_and_name(
        remote: tuple[str, Path], gateway_factory: GatewayFactory) -> None:
    url, events = remote
    gw = gateway_factory([
        {"id": "far", "backend": "remote",
         "source": {"url": url, "api_key": "remote-secret", "model": "upstream-name"}},
        {"id": "unreachable", "backend": "remote",
         "source": {"url": "http://127.0.0.1:9/v1"}, "max_restarts": 0},
    ])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    completion = client.chat.completions.create(
        model="far", messages=[{"role": "user", "content": "hi"}])
    # The remote saw its own model name and the key configured for it.
    assert completion.model == "upstream-name"
    stream = client.chat.completions.create(
        model="far", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "word0 word1 word2 "
    assert gw.model("far")["state"] == "ready"
    # Routed to, never started: the remote process is the only one that ever started.
    assert events.read_text().count("started") == 1

    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="unreachable", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert "unreachable" in info.value.message
