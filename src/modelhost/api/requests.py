"""Checking a /v1 request body: only what the gateway needs, the worker does the rest. (Bodies
are read, bounded, by `modelhost.serving.answers.read_body`.)"""

from __future__ import annotations

import json
from typing import Any

import orjson

from modelhost.errors import InvalidRequest


def parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(body)
    except ValueError:
        # orjson is stricter than the workers' parsers (NaN, integers past 64 bits): what it
        # refuses, the standard library decides.
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise InvalidRequest(
                f"We could not parse the JSON body of your request ({exc}). The OpenAI API "
                "expects a JSON payload.") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return payload


def require_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    return model


def check_stream(payload: dict[str, Any]) -> None:
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"{stream!r} is not of type 'boolean' - 'stream'", param="stream")


def check_chat(payload: dict[str, Any]) -> None:
    messages = payload.get("messages")
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"'messages[{i}]' must be an object with a 'role'.",
                                 param=f"messages[{i}]")
    check_stream(payload)


def check_completion(payload: dict[str, Any]) -> None:
    prompt = payload.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    if not isinstance(prompt, str | list):
        raise InvalidRequest("'prompt' must be a string or an array.", param="prompt")
    check_stream(payload)


def check_embedding(payload: dict[str, Any]) -> None:
    value = payload.get("input")
    if value is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise InvalidRequest("'input' must be a string or a non-empty array.", param="input")
