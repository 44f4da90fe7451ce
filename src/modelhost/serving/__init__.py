"""Serving requests: from bytes on a socket to a relayed answer (docs/architecture.md).

    protocol.py   the HTTP protocol (uvicorn's, tuned): the gate at every request's headers,
                  deadlines and the connection cap (limits.py); relayed routes to the wire path
    server.py     the HTTP server: graceful drain before shutdown
    front.py      the ASGI app: the gate (Host, Origin, key, draining), relayed routes, FastAPI
    wire.py       the wire path: a relayed route served from the protocol, one write per answer
    endpoint.py   a relayed JSON route: the request checked, its model resolved, one call
    call.py       one relayed call: admission, a ready worker, send, answer, settle, usage
    stream.py     a stream (or a large answer) passed through as it arrives
    failures.py   what a client is told when a worker fails it
    answers.py    answers and bodies without Starlette objects; the last-resort 500
"""
