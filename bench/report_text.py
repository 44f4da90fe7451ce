"""The prose of docs/benchmarks.md that no figure of a run changes: how to run the
benchmarks, the arms, how to read the numbers and what the profile changed over time."""

HISTORY = """
## What the profile changed

The first complete run (quick mode, commit 21fa29e, a quiet machine) measured modelhost at
500 req/s adding 0.93 ms at p50 and 3.31 ms at p99, for 0.58 CPU s per 1,000 requests. Its
profile put 40 % of the gateway's CPU in aiohttp's client, 30 % in uvicorn, 10 % in
Starlette/FastAPI and 6 % in JSON; modelhost's own code was under 6 %. What was done about it,
in the order of that list:

1. **The client to the workers** (`src/modelhost/upstream/`) is modelhost's own: pooled
   keep-alive HTTP/1.1 connections on asyncio's protocol layer, a request written with one
   `write`, answers parsed by httptools (the parser uvicorn uses) and handed on as they arrive,
   one timer for every connection's silence timeout instead of one per request, flow control
   for slow clients, a pooled connection the worker had just closed retried once.
2. **The hot routes skip FastAPI**: chat, completions and embeddings are raw ASGI apps
   (`api/openai.py`), called by `front.py` straight from the server after the key check;
   answers are sent with two ASGI messages (`asgi.py`) instead of Starlette response objects.
   Everything else (admin API, audio, models, health) still goes through FastAPI.
3. **One write per answer**: uvicorn writes a response's head and body separately;
   `server.py` holds a write until the next one or the end of the event-loop iteration, so
   a JSON answer leaves in one system call and the client wakes once (about 50 µs at p50).
4. **The body peek** uses orjson (the standard library decides what orjson refuses).
5. **Smaller things**: the API-key check hashes the raw header once; the worker's headers are
   scanned once; everything alive after start-up is frozen out of the garbage collector's
   walks; uvicorn's X-Forwarded-* handling runs only when `MODELHOST_FORWARDED_ALLOW_IPS`
   names a proxy.

In step-by-step measurements (500 req/s, 3 rounds of 4 s each) these took the added p50 from
about 0.9 ms to about 0.6 ms and the CPU per 1,000 requests from 0.58-0.72 s to 0.38-0.41 s.
This machine is a shared virtual machine whose speed varies from hour to hour (the fake
upstream's closed-loop maximum ranged from 9,500 to 22,000 req/s between runs with nothing else
running here), so every comparison below was made inside one run, arms interleaved.

6. **The hot routes skip ASGI too** (`server.py`): a chat, completions or embeddings request
   is served by `HotCycle` straight from uvicorn's HTTP protocol, its body collected as the
   parser delivers it and its answer written as one buffer; uvicorn still owns the connection
   (keep-alive, pipelining, flow control, shutdown), and every other request goes through its
   ASGI cycle as before. Measured against the previous commit in one run (4 rounds of 4 s,
   interleaved): at 500 req/s the added p50/p99 went from 0.57/1.78 ms to 0.48/1.56 ms and the
   CPU per 1,000 requests from 0.355 s to 0.310 s; at 200 req/s nothing moved (0.55 ms).

7. **The common case runs without a task** (`relay.Exchange`, `server.HotRoute.start`): a hot
   request's cycle is started when its body is complete, and when the model is ready, one of
   its slots is free and an idle connection to its worker is pooled, the request is written
   to the worker from the parser's callback and the answer to the client from the worker
   connection's callback: no task, no future, no await, and one event-loop pass less per
   wake-up. An error status, a stream, a broken connection or a busy model goes on in a task,
   the awaited way, with what was received so far. Measured against the previous commit in
   two runs (4 rounds of 4 s, interleaved): at 500 req/s the CPU per 1,000 requests went from
   0.292 to 0.257 s and from 0.363 to 0.320 s, the added p50 from 0.43 to 0.38 ms and from
   0.61 to 0.57 ms; at 200 req/s the p50 from 0.58 to 0.52 ms and from 0.70 to 0.47 ms. Under
   heavy load it matters more: at 1,500 req/s the added p99 of a full run went from 78 ms to
   2.1-2.9 ms (two full runs), and one of those runs held 1,000 concurrent streams (500
   before, and 500 in the other run: 1,000 is at the edge).

8. **The pinning had never happened** (found on 2026-12-04). The runner pins itself to core 0
   and then starts the arms asking for core 1, but the check that decided whether pinning was
   possible read the runner's own affinity, by then a single core: nothing was pinned, and
   every process inherited core 0. In every run above, the load generator, the fake upstream
   and the gateway under test shared one core while the other sat idle, and in the real-model
   part the worker started by hand ran on the client's core while the gateway's own worker had
   a core to itself (the previous full run's 116.9 % tokens/s through modelhost was that). The
   comparisons above were each made inside one configuration and stand; their absolute figures
   are those of a gateway that shared its core with its load. Now a process that does not run
   on the cores it was started for stops the run, and the page shows the cores read back from
   the kernel. A short A/B on the November machine (3 rounds of 4 s at 500 req/s, arms
   interleaved) put the added p50/p99 at 0.53/2.02 ms with everything on one core against
   0.32-0.33/1.0-2.6 ms with the gateway on its own core, for the same 0.30-0.32 CPU s per
   1,000 requests.

What is left is spread thin. In the full run of 2026-12-04 (the gateway on a core of its own),
py-spy, sampling the thread that holds the GIL at 500 req/s, charged the gateway's 198 µs of
CPU per request to modelhost's server hot path (23 %), the two socket writes (21 %), uvicorn's
HTTP protocol (17 %), the handler (10 %), uvloop's own C code (10 %), relay, admission and
registry (9 %), the client to the worker (8 %) and the key check (2 %); no line holds more
than 12 % (the coalescing writer's `write`, which is the kernel's send). `perf` on the gateway
at 500 req/s (before step 7) put 58 % of its CPU in the Python interpreter, 20 % in the kernel
(the sockets), 7 % in uvloop, 4 % in httptools, 2 % in OpenSSL's SHA-256 and 1.5 % in orjson.
Driven in-process in a closed loop (a fake client socket, the real worker over loopback), the
whole request path costs about 115-135 µs of CPU (150 µs before step 7), spread over some
thirty Python functions. Over a real socket it costs more, because every request wakes an
idle process twice (request, then the worker's answer) into cold caches; that is also why
the CPU per request is higher at 20 req/s than at 500.

Compiling the request path with mypyc (mypy 2.4: `server.py`, `front.py`, `relay.py`,
`upstream.py`, `asgi.py`, `auth.py`, `api/openai.py`, `api/requests.py`, `admission.py`) was
tried and dropped: the classes that extend uvicorn's protocol and cycle and asyncio's
`Protocol` must stay non-native, async generators are not supported, and the compiled path was
slower in-process (170-195 µs against 130-160 µs per request, interleaved runs), as mypyc's
coroutines cost more than CPython's here. The remaining cost is the interpreter's: a further
step would move the HTTP parsing callbacks and the relay into native code (a C or Rust
extension), which this project has not taken on.

**Instructions per request, commit by commit** (2026-12-06). Observability (issue 15) and
everything after it made a relayed request cost x1.37 the CPU time of 061adbe in
`bench.compare`, a figure that moves by several percent with the machine's load and so could
not say which change cost what. `python -m bench.instructions REV...` counts instead: each
revision's gateway runs under Valgrind's callgrind, counting only two paced windows of 30 s
(400 and then 800 requests: the timers do the same in both, so the difference is the requests'
own), the same to within 0.3 % from one run to the next on a loaded machine. Per request:

| revision | what it added | instructions per request |
|---|---|---|
| 061adbe | (the reference) | 184,010 |
| e3b9955 | issue 14: one request path, one owner per model | 184,432 (x1.002) |
| 34871e6 | request ids in logs and answers, Server-Timing, metrics | 209,063 (x1.134) |
| 88c5753 | the relayed calls' metrics tallies | 216,717 (x1.175) |
| f9fe510 | usage by key (the answer's `usage` read, the ledger) | 241,322 (x1.308) |
| 9d38897 | the rest: UUIDs to workers, rollouts, access log, replicas | 245,524 (x1.331) |

`python -m bench.calls A B` (Python calls per request by function, exact counts) shows each
step as a dozen or so small calls, none over a few thousand instructions: the usage step is
`answer_tokens` with its JSON decode of the `usage` object, the key's id, the ledger's hour
bucket, and so on. Nothing stands out to remove: what a request costs now is what it is
measured and counted by. The same windows also show the usage ledger's flush, a SQLAlchemy
upsert once a second in the database thread, at about 3 million instructions a second while
requests come in (a millisecond of CPU a second, whatever the rate).
"""


HEADER = """
# Benchmarks

A gateway earns its place only if it costs almost nothing. These benchmarks measure what
modelhost adds to the direct path, side by side with the LiteLLM proxy in the same run, and
what it does to streams and to a real model's tokens per second. Everything below was
produced by the benchmark itself (`bench/`), from the JSON in `bench/results/`; re-running it
rewrites this page. Benchmarks print figures; the test suite never asserts timings.

## Running them

```bash
bench/run                 # quick mode: a few minutes (what this page shows unless noted)
bench/run --full          # full mode: more rates, longer steps, more rounds (about 35 minutes)
bench/run --only overhead,streaming   # parts: overhead, streaming, profile, model, large
bench/run --ray           # also the "ray" part (opt-in, about two minutes, needs Ray): the
                          # relay to a worker on another Ray node; --only ray runs it alone
bench/run --no-litellm    # leave the LiteLLM arm out
bench/run --scrape 15     # scrape the "modelhost (scraped)" arm's /metrics every 15 s
                          # (default: every 1 s; --scrape 0 leaves that arm out)
bench/run --report        # re-render this page from bench/results/ only
bench/run --commit HEAD   # measure a commit's src/ (exported with git archive), not the
                          # working tree: a clean baseline while src/ is being edited
.venv/bin/python -m bench.compare main~5   # two revisions side by side (the second: the
                          # working tree, or a second REV): the gateway's CPU per request and
                          # closed-loop throughput, alternating rounds, medians and their ratio
.venv/bin/python -m bench.instructions 061adbe HEAD   # instructions per request under
                          # Valgrind (apt-get install valgrind), any number of revisions:
                          # exact whatever the load, about 2 minutes per revision
.venv/bin/python -m bench.calls 061adbe HEAD   # Python calls per request, by function
```

`bench.compare` is for a change that should cost nothing per request (a restructuring): the
paced steps of `bench/run` move by tens of percent from run to run on a two-core machine, while
CPU per request in a closed loop, both revisions running at once and measured in turns, is
steady to a few percent.

`bench/run` is `.venv/bin/python -m bench`. It first installs the benchmark's own
dependencies (`bench/requirements.txt`: matplotlib, numpy, psutil, py-spy) into `.venv`, and
on first use creates `bench/.venv-litellm` with `pip install 'litellm[proxy]' httptools`
(httptools is the HTTP parser that `uvicorn[standard]` brings and modelhost uses; without it
LiteLLM's uvicorn would fall back to h11). Every process it starts listens on 127.0.0.1 only
(the `ray` part's two Ray nodes and the worker on the second: 127.0.0.2 and 127.0.0.3, loopback
too) and is stopped when the run ends, Ctrl-C included; every step is bounded in time and in
requests. Results go to `bench/results/*.json`, figures to `docs/benchmarks/*.png`.
"""

ARMS = """
## The arms

- **direct**: the load generator talks straight to the fake upstream (`bench/upstream.py`):
  a real process, a raw asyncio protocol on uvloop with httptools and pre-encoded answers, with
  configurable time to first token, number of tokens, gap between tokens and response size
  (set by flags, or per request through the model name, e.g. `st-ttft50-gap10-n40`).
- **floor** (a reference, not a gateway): `bench/floor.py`, a byte-for-byte TCP relay on
  uvloop in its own process on the gateway's core, with no HTTP parsing at all. It shows what
  one more process hop costs on this machine (loopback round trip, waking another process on
  another core); what a gateway adds beyond the floor is its own work.
- **modelhost**: `python -m modelhost serve --config FILE --port P`, as users start it, with
  `OPENAI_API_KEYS` set (so every request is authenticated) and its data directory in a
  temporary folder. Each benchmark model is a `remote` model whose URL is the same upstream
  process the direct arm hits (`max_concurrency` raised, since the per-model queue of a remote
  server is configuration, not gateway overhead). Default logging: level `info`, access log off
  (its default), so the relayed routes take the server's hot path.
- **modelhost (scraped)**: a second modelhost gateway started exactly like the first (same
  configuration, same core, same upstream), whose `/metrics` is scraped every second (`--scrape
  S`) during its overhead and streaming steps by `bench/scrape.py`, a Prometheus stand-in in
  its own process on the load generator's core (Prometheus's headers, the admin key, one
  keep-alive connection). Side by side with **modelhost** it shows what being watched costs
  on the request path: *What being scraped costs* below. It takes no part in the large
  answers and the profile.
- **litellm**: the LiteLLM proxy, `litellm --config FILE --num_workers 1`, each model an
  `openai/<name>` entry whose `api_base` is the same upstream, a `master_key`, no database,
  callbacks off, telemetry off, `LITELLM_LOG=ERROR`, the local model cost map.

Cores: the machine has two. The load generator (this benchmark's own process, a small
asyncio HTTP client that schedules requests by arrival time) and the fake upstream share
core 0; the gateway under test runs alone on core 1 (every gateway is pinned there and stays
up for the whole run; the idle ones cost next to nothing, and the scraped one is scraped only
during its own steps). The arms are interleaved: every
round runs every rate on every arm, in a rotating order, with the same arrival times.
"""

CAVEATS = """
## How to read these numbers

- **Added latency** is a gateway's percentile minus the direct arm's at the same rate, over
  all the rounds pooled. Latency is measured per request from the moment it is written to
  the socket to the last byte of the answer. *p99 from due* also counts the time between when
  a request was due (its Poisson arrival time) and when the generator sent it: the generator
  never waits for earlier answers (open loop, a new connection when none is idle), so backlog
  shows there and in errors instead of being hidden. The generator's own lag (timer
  granularity, about 1 ms) is reported for every step.
- **CPU seconds per 1,000 requests** is the CPU time of the gateway process (of the upstream
  for the direct arm) over a step, warm-up included, per 1,000 requests sent, read from the
  scheduler's nanosecond counters (`/proc/PID/task/*/schedstat`).
- **This machine is slow to wake a sleeping process.** It is a small VM whose idle cores
  halt: a process woken on an idle core waits for that core to come back, and finds its
  caches cold after every idle gap. Every Python server pays more CPU per request at low rates
  than at high ones (compare the direct arm's CPU per 1,000 requests at the lowest and the
  highest rate), and every hop pays a wake-up, which is why a gateway's added latency is
  higher at 10-50 req/s than at 500. The floor arm measures that cost for one more process.
- **The knee** is the lowest rate at which errors exceed 0.1 % or the p99 from due exceeds
  10 times the arm's own p99 at the lowest rate (and 10 ms). An arm that collapses (errors
  over 5 % or p99 over 2 s) is not asked for higher rates.
- Two cores are very little, and the machine may be running other work (how much is noted
  under *Machine and versions*): single figures move by tens of percent between runs, and
  the quick mode's short steps make p99 noisy. The full mode is the one to quote.
"""
