"""The images' HEALTHCHECK: GET /ready on the gateway inside the container.

Exit 0 when it answers 200 (every model marked `required` is ready), 1 otherwise (starting,
a required model still loading or failed, draining after SIGTERM, not listening), with the
answer or the error on stderr, which `docker inspect` keeps in the container's health log.
Written in Python because the images have no curl or wget. It asks 127.0.0.1, a loopback
name that the gateway's Host check always accepts, on the port the gateway listens on
(MODELHOST_API_PORT or API_PORT, 8000 by default); /ready needs no key. Proxies from the
environment are ignored: the probe must reach this container, not a proxy.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0


def ready_url(environ: dict[str, str]) -> str:
    port = environ.get("MODELHOST_API_PORT") or environ.get("API_PORT") or "8000"
    return f"http://127.0.0.1:{port}/ready"


def probe(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """Whether `url` answers 200, and what to say about it."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as answer:
            body = answer.read(2048).decode(errors="replace")
            return answer.status == 200, f"{answer.status} {body}"
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code} {exc.read(2048).decode(errors='replace')}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def main() -> None:
    ok, said = probe(ready_url(dict(os.environ)))
    print(said, file=sys.stdout if ok else sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
