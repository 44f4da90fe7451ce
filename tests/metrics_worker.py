"""A stand-in engine that serves its own Prometheus metrics, as vLLM does: a real process.

    python tests/metrics_worker.py --port PORT [--mode MODE] [--events FILE]

GET /v1/models (the readiness probe), POST /v1/chat/completions (a fixed answer), and
GET /metrics according to MODE:
    ok      a counter (with a `model` label of its own), a gauge and a histogram, in the
            names and shapes vLLM writes (`vllm:...`), plus one named like the gateway's own
    slow    the same, 30 s late
    huge    an endless body (the reader must stop)
    broken  a body that is not the text format
    absent  404, as modelhost's own worker apps answer
Every GET /metrics is appended to FILE as a line "metrics" (with --events).
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

EXPOSITION = """\
# HELP vllm:num_requests_running Requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="engine-name"} 3.0
# HELP vllm:prompt_tokens_total Prompt tokens.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="engine-name",model="inner"} 42.0
# HELP vllm:e2e_request_latency_seconds Latency.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0"} 1.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf"} 2.0
vllm:e2e_request_latency_seconds_sum 3.5
vllm:e2e_request_latency_seconds_count 2.0
# HELP modelhost_up An engine pretending to be the gateway.
# TYPE modelhost_up gauge
modelhost_up 7.0
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--events")
    args = parser.parse_args()

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"},
             "finish_reason": "stop"}]})

    async def metrics(request: web.Request) -> web.StreamResponse:
        if args.events:
            with open(args.events, "a") as f:  # noqa: ASYNC230 (a line, in a test stand-in)
                f.write("metrics\n")
        if args.mode == "absent":
            return web.Response(status=404, text="not found")
        if args.mode == "slow":
            await asyncio.sleep(30)
        if args.mode == "broken":
            return web.Response(text="this is {not the text format\n\x00")
        if args.mode == "huge":
            resp = web.StreamResponse()
            await resp.prepare(request)
            line = b"# HELP x y\n" * 4096
            for _ in range(100_000):
                await resp.write(line)
            return resp
        return web.Response(text=EXPOSITION, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
