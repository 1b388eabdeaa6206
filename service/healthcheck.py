"""The container's HEALTHCHECK (Dockerfile, docker-compose.yml): GET /readyz on this host.

Exit 0 when ready; otherwise exit 1 with the reason on stderr, which Docker keeps in
`docker inspect`'s health log. The urllib one-liner it replaces showed only "HTTP Error 503:
Service Unavailable" there, so an operator had to find the service's log to learn whether the
models were still loading, the job store was locked or the engine failing. Standard library
only: it runs every 30 s and must not import torch."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(port: int, timeout: float = 4.0) -> str | None:
    """None when ready, else why not (the 503's JSON body, or why nothing answered)."""
    url = f"http://127.0.0.1:{port}/readyz"
    # no proxy: urlopen sent the container's own address to http_proxy, which Docker copies into
    # every container from the host's ~/.docker/config.json at a site that needs one for PyPI,
    # and its no_proxy takes no CIDR (127.0.0.0/8): the container stayed unhealthy (an audit)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return f"not ready: HTTP {e.code} {e.read(2000).decode(errors='replace').strip()}"
    except OSError as e:  # URLError (refused, no route) and timeouts
        return f"no answer from {url}: {getattr(e, 'reason', e)}"


def main() -> int:
    reason = check(int(os.environ.get("CERVIXQC_PORT", "8000")))
    if reason is not None:
        print(reason, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
