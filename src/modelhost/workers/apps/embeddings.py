"""Embeddings worker: `POST /v1/embeddings` in OpenAI's shape, over sentence-transformers.

    python -m modelhost.workers.apps.embeddings --model PATH_OR_NAME --host 127.0.0.1 \
        --port N --served-name ID [--device cpu|cuda|auto] [--batch-size 32] \
        [--max-inputs 2048] [--max-seq-length N] [--truncate] [--trust-remote-code]

The model is loaded (and run once) before the port opens, so `GET /v1/models` answering 200 means
ready. Routes: `GET /v1/models`, `GET /health`, `POST /v1/embeddings`.

What a request gets, and why:

- `input`: a string or a list of strings (at most `--max-inputs`, 2048 as at OpenAI). Empty
  strings and empty lists are rejected, as OpenAI does. Token-id input (a list of ints, or of
  lists of ints) is rejected with a 400: OpenAI's token ids are tiktoken ids, and the clients
  that send them (LangChain's `OpenAIEmbeddings` with its default `check_embedding_ctx_length`)
  tokenized with OpenAI's vocabulary; read in this model's vocabulary they would give wrong
  vectors without any error.
- Length: an input longer than the model's maximum sequence (special tokens included; 256 for
  all-MiniLM-L6-v2) is a 400 (`code: context_length_exceeded`), as at OpenAI, rather than
  sentence-transformers' silent truncation. `--truncate` makes truncation the default, and a
  request may ask for it with `"truncate": true` (or refuse it with `false`).
- Vectors are L2-normalised (cosine similarity is a dot product), float32. `encoding_format`
  `float` (the default) gives JSON numbers, `base64` the little-endian float32 bytes, base64
  encoded: what the official client asks for by default and decodes. `dimensions` keeps the
  first N components and normalises again (OpenAI's shortening); above the model's dimension it
  is a 400. `user` is ignored.
- `usage.prompt_tokens` (= `total_tokens`) counts the tokens the model ran on: its own
  tokenizer's, special tokens included, after truncation. The same number is in the
  `X-Input-Tokens` response header, so the gateway can count without parsing the body.

One encode runs at a time, in a dedicated thread: concurrent requests queue rather than fight
for the same cores (a request whose client went away before its turn is dropped). A body over
64 MiB is a 413. The command line, `/v1/models`, `/health`, the error envelope (OpenAI's:
`{"error": {"message", "type", "param", "code"}}`) and the graceful stop on SIGTERM are the
worker apps' skeleton (skeleton.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modelhost.errors import InvalidRequest
from modelhost.workers.apps.skeleton import (
    add_common_arguments,
    build_worker_app,
    load_or_exit,
    read_body,
    serve,
    setup_logging,
)

log = logging.getLogger("modelhost.workers.embeddings")

# OpenAI's limit on the number of inputs in one request.
MAX_INPUTS = 2048
# A request body larger than this is refused (413) before it is parsed.
MAX_BODY_BYTES = 64 * 1024 * 1024
TOKENS_HEADER = "X-Input-Tokens"

Vectors = npt.NDArray[np.float32]
EncodingFormat = Literal["float", "base64"]


# --- the request ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    truncate: bool | None = None  # None: the worker's default


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _texts(value: object, max_inputs: int) -> list[str]:
    if value is None:
        raise InvalidRequest("'input' is required: a string or a list of strings",
                             param="input")
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' cannot be an empty string", param="input")
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest(f"'input' must be a string or a list of strings, not "
                             f"{type(value).__name__}", param="input")
    if not value:
        raise InvalidRequest("'input' cannot be an empty list", param="input")
    if all(_is_int(v) for v in value) or all(
            isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
        raise InvalidRequest(
            "token-id input is not supported by this model: send text. (Token ids "
            "from an OpenAI tokenizer mean nothing in this model's vocabulary; LangChain's "
            "OpenAIEmbeddings sends them unless check_embedding_ctx_length=False.)",
            param="input", code="unsupported_input")
    if len(value) > max_inputs:
        raise InvalidRequest(f"'input' has {len(value)} items; at most {max_inputs} are "
                             "allowed in one request", param="input", code="too_many_inputs")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequest(f"'input[{i}]' must be a string, not {type(item).__name__}",
                                 param=f"input[{i}]")
        if not item:
            raise InvalidRequest(f"'input[{i}]' cannot be an empty string",
                                 param=f"input[{i}]")
    return value  # every item was checked to be a str


def parse_request(payload: object, *, max_inputs: int, dimension: int) -> EmbeddingRequest:
    """Validate an `/v1/embeddings` body (already decoded JSON); InvalidRequest if invalid."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    texts = _texts(payload.get("input"), max_inputs)
    fmt = payload.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest(f"'encoding_format' must be 'float' or 'base64', not {fmt!r}",
                             param="encoding_format")
    dims = payload.get("dimensions")
    if dims is not None:
        if not _is_int(dims) or dims < 1:
            raise InvalidRequest("'dimensions' must be a positive integer", param="dimensions")
        if dims > dimension:
            raise InvalidRequest(f"'dimensions' is {dims}, but this model's embeddings have "
                                 f"{dimension}", param="dimensions")
    truncate = payload.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise InvalidRequest("'truncate' must be true or false", param="truncate")
    return EmbeddingRequest(texts=texts, encoding_format="base64" if fmt == "base64" else "float",
                            dimensions=dims, truncate=truncate)


# --- the response ---------------------------------------------------------------------------


def shorten(vectors: Vectors, dimensions: int) -> Vectors:
    """Keep the first `dimensions` components of each row and L2-normalise it again."""
    head = vectors[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    out: Vectors = (head / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def encode_base64(vector: Vectors) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def response_body(vectors: Vectors, fmt: EncodingFormat, model: str,
                  tokens: int) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i,
             "embedding": encode_base64(row) if fmt == "base64" else row.tolist()}
            for i, row in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# --- the model ------------------------------------------------------------------------------


class Encoder(Protocol):
    dimension: int
    max_tokens: int | None  # the longest input, special tokens included; None: no limit

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included; capped at max_tokens + 1."""
        ...

    def encode(self, texts: Sequence[str]) -> Vectors:
        """L2-normalised float32 vectors, one row per text, in order (truncating as needed)."""
        ...


class SentenceEncoder:
    """A sentence-transformers model behind the narrow `Encoder` interface."""

    def __init__(self, model: str, *, device: str = "auto", batch_size: int = 32,
                 max_seq_length: int | None = None, trust_remote_code: bool = False) -> None:
        from sentence_transformers import SentenceTransformer

        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.batch_size = batch_size
        self._model = SentenceTransformer(model, device=device,
                                          trust_remote_code=trust_remote_code)
        if max_seq_length:
            self._model.max_seq_length = max_seq_length
        self._tokenizer: Any = self._model.tokenizer
        limit = self._model.max_seq_length
        self.max_tokens: int | None = int(limit) if limit else None
        self.dimension: int = int(self.encode(["warm-up"]).shape[1])

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        options: dict[str, Any] = {"add_special_tokens": True,
                                   "return_attention_mask": False,
                                   "return_token_type_ids": False}
        if self.max_tokens is not None:
            # Enough to tell "too long" without a warning or a huge list for a huge text.
            options.update(truncation=True, max_length=self.max_tokens + 1)
        ids = self._tokenizer(list(texts), **options)["input_ids"]
        return [len(seq) for seq in ids]

    def encode(self, texts: Sequence[str]) -> Vectors:
        out = self._model.encode(list(texts), batch_size=self.batch_size,
                                 convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


# --- the app --------------------------------------------------------------------------------


class EmbeddingService:
    """Validation, token accounting and the one encoding thread, for one loaded model."""

    def __init__(self, encoder: Encoder, served_name: str, *, max_inputs: int = MAX_INPUTS,
                 truncate: bool = False) -> None:
        self.encoder = encoder
        self.served_name = served_name
        self.max_inputs = max_inputs
        self.truncate = truncate
        # One thread: encodes run one after the other. A queued job whose request was
        # cancelled never starts; a running one finishes before the next starts.
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="encode")

    def _run(self, request: EmbeddingRequest) -> tuple[Vectors, int]:
        counts = self.encoder.count_tokens(request.texts)
        limit = self.encoder.max_tokens
        truncate = self.truncate if request.truncate is None else request.truncate
        if limit is not None:
            over = [i for i, n in enumerate(counts) if n > limit]
            if over and not truncate:
                i = over[0]
                where = "'input'" if len(counts) == 1 else f"'input[{i}]'"
                raise InvalidRequest(
                    f"{where} is longer than this model's maximum of {limit} tokens "
                    f"(special tokens included); shorten it, or ask for truncation with "
                    f"\"truncate\": true", param="input" if len(counts) == 1 else f"input[{i}]",
                    code="context_length_exceeded")
            counts = [min(n, limit) for n in counts]
        vectors = self.encoder.encode(request.texts)
        if request.dimensions is not None and request.dimensions < vectors.shape[1]:
            vectors = shorten(vectors, request.dimensions)
        return vectors, sum(counts)

    async def embeddings(self, http: Request) -> Response:
        try:
            payload = json.loads(await read_body(http, MAX_BODY_BYTES))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
        request = parse_request(payload, max_inputs=self.max_inputs,
                                dimension=self.encoder.dimension)
        loop = asyncio.get_running_loop()
        vectors, tokens = await loop.run_in_executor(self.executor, self._run, request)
        body = response_body(vectors, request.encoding_format, self.served_name, tokens)
        return JSONResponse(body, headers={TOKENS_HEADER: str(tokens)})


def build_app(service: EmbeddingService) -> Starlette:
    return build_worker_app(
        name="embeddings", served_name=service.served_name,
        card={"dimensions": service.encoder.dimension,
              "max_input_tokens": service.encoder.max_tokens},
        routes=[Route("/v1/embeddings", service.embeddings, methods=["POST"])],
        on_shutdown=[lambda: service.executor.shutdown(wait=False, cancel_futures=True)])


# --- the process ----------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modelhost.workers.apps.embeddings",
        description="OpenAI-compatible /v1/embeddings over a sentence-transformers model.")
    parser.add_argument("--model", required=True,
                        help="a local model folder, or a Hugging Face id already in the cache")
    add_common_arguments(parser, device_help="cpu, cuda, cuda:N or auto",
                         served_name_required=True)
    parser.add_argument("--batch-size", type=_positive, default=32)
    parser.add_argument("--max-inputs", type=_positive, default=MAX_INPUTS,
                        help="most inputs in one request")
    parser.add_argument("--max-seq-length", type=_positive,
                        help="override the model's maximum input tokens")
    parser.add_argument("--truncate", action="store_true",
                        help="truncate over-long inputs by default instead of refusing them")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if Path(args.model).exists():
        # A local model: nothing is to be fetched, not even a config file.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    encoder = load_or_exit(
        f"the embedding model {args.model}",
        lambda: SentenceEncoder(args.model, device=args.device, batch_size=args.batch_size,
                                max_seq_length=args.max_seq_length,
                                trust_remote_code=args.trust_remote_code))
    log.info("serving %s as '%s' on %s: %d dimensions, at most %s tokens per input",
             args.model, args.served_name, encoder.device, encoder.dimension,
             encoder.max_tokens or "unlimited")
    service = EmbeddingService(encoder, args.served_name, max_inputs=args.max_inputs,
                               truncate=args.truncate)
    serve(build_app(service), args)


if __name__ == "__main__":
    main()
