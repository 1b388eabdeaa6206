"""A reverse proxy serving a service under a path prefix, as nginx's
`location /cervixqc/ { proxy_pass http://127.0.0.1:PORT/; }` does: requests under the prefix go
upstream with it stripped, the answer comes back as it is (headers, cookies, redirects), and
anything else is the proxy's own 404. For the tests of CERVIXQC_ROOT_PATH: nginx is no
dependency of the suite."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


class PrefixProxy:
    def __init__(self, prefix: str, upstream_port: int) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if not self.path.startswith(prefix + "/"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path[len(prefix):], body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()  # whole: nginx buffers answers too
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()
                proxy.seen.append(self.path)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self.seen: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{prefix}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
