"""The API address (`doctor.ports`): bound here the way `modelhost serve` binds it
(uvicorn: one socket, IPv6 when the host has a colon, SO_REUSEADDR), then closed at once.

When the port is taken, `GET /ready` on it tells a running modelhost gateway (its answer
lists the models) from another program: the fix differs.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import socket

from modelhost.checks.report import Finding
from modelhost.doctor.context import Context, failed, not_applicable, passed
from modelhost.doctor.rules import PORTS

PROBE_TIMEOUT = 2.0


def bind_problem(host: str, port: int) -> OSError | None:
    """None when `host:port` can be bound now, else the error binding it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        return exc
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc
    return None


def modelhost_on(host: str, port: int) -> str | None:
    """What a modelhost gateway on `host:port` says of itself (its readiness and models),
    or None when what answers there is not one."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    connection = http.client.HTTPConnection(target.strip("[]"), port, timeout=PROBE_TIMEOUT)
    try:
        connection.request("GET", "/ready")
        answer = json.loads(connection.getresponse().read(65536))
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        with contextlib.suppress(OSError):
            connection.close()
    if not isinstance(answer, dict) or not isinstance(answer.get("models"), dict):
        return None
    return f"{answer.get('status')}, {len(answer['models'])} model(s)"


def check_ports(ctx: Context) -> list[Finding]:
    host, port = ctx.settings.api_host, ctx.settings.api_port
    if port == 0:
        return [not_applicable(PORTS, "API_PORT=0: the system picks a free port at start")]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    problem = bind_problem(host, port)
    if problem is None:
        return [passed(PORTS, f"{where} is free")]
    fix = "stop what holds it, or choose another port (`--port`, API_PORT)"
    if problem.errno == errno.EADDRINUSE:
        gateway = modelhost_on(host, port)
        if gateway is not None:
            return [failed(PORTS, f"{where} is taken by a running modelhost gateway "
                                  f"({gateway})",
                           "stop that gateway first (SIGTERM drains it), or give this one "
                           "another port (`--port`, API_PORT)")]
        return [failed(PORTS, f"{where} is in use by another program", fix)]
    if problem.errno == errno.EACCES:
        return [failed(PORTS, f"{where}: no permission to bind it (ports below 1024 need "
                              "privileges)",
                       "use a port of 1024 or more, behind a reverse proxy if need be")]
    if problem.errno == errno.EADDRNOTAVAIL or isinstance(problem, socket.gaierror):
        return [failed(PORTS, f"{where}: {host} is not an address of this machine",
                       "set API_HOST to one of this machine's addresses (127.0.0.1, "
                       "0.0.0.0 for all)")]
    return [failed(PORTS, f"{where} cannot be bound: {problem.strerror or problem}", fix)]
