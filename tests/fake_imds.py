"""A fake EC2 instance metadata service (IMDSv2 only) on 127.0.0.1 for the launch tests.

It behaves like the real one where launch/node.py depends on it: a session token
from PUT /latest/api/token (with the TTL header), 401 for any GET without that token,
404 on spot/instance-action until `notice()`, then the JSON notice AWS documents; the same
for events/recommendations/rebalance and `rebalance()`; and the instance's type, zone,
lifecycle and address.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"


class FakeImds:
    def __init__(self, local_ipv4: str = "127.0.0.1", instance_type: str = "g5.24xlarge", zone: str = "us-east-1a"):
        self.local_ipv4 = local_ipv4
        self.meta = {
            "/latest/meta-data/local-ipv4": local_ipv4,
            "/latest/meta-data/instance-type": instance_type,
            "/latest/meta-data/placement/availability-zone": zone,
            "/latest/meta-data/instance-life-cycle": "spot",
        }
        self.token = secrets.token_hex(16)
        self.notice_body: bytes | None = None
        self.rebalance_body: bytes | None = None
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.unauthorized_gets = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> FakeImds:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def notice(self, action: str = "stop") -> None:
        """From now on spot/instance-action announces an interruption two minutes ahead."""
        when = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=2)
        body = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        with self._lock:
            self.notice_body = json.dumps(body).encode()

    def rebalance(self) -> None:
        """From now on events/recommendations/rebalance recommends a rebalance."""
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            self.rebalance_body = json.dumps({"noticeTime": when}).encode()

    def expire_token(self) -> None:
        """Invalidate the issued token, as its TTL running out would."""
        with self._lock:
            self.token = secrets.token_hex(16)

    def count(self, method: str, path: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for m, p, s in self.log if m == method and p == path and status in (None, s))

    def _handler(self):
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body: bytes = b"") -> None:
                with imds._lock:
                    imds.log.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                ttl = self.headers.get(TTL_HEADER, "")
                if self.path != TOKEN_PATH:
                    return self._reply(404)
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return self._reply(400)
                with imds._lock:
                    token = imds.token
                self._reply(200, token.encode())

            def do_GET(self):
                with imds._lock:
                    authorized = self.headers.get(TOKEN_HEADER) == imds.token
                    if not authorized:
                        imds.unauthorized_gets += 1
                    notice, rebalance = imds.notice_body, imds.rebalance_body
                if not authorized:
                    return self._reply(401)
                if self.path == NOTICE_PATH:
                    return self._reply(200, notice) if notice else self._reply(404)
                if self.path == REBALANCE_PATH:
                    return self._reply(200, rebalance) if rebalance else self._reply(404)
                if self.path in imds.meta:
                    return self._reply(200, imds.meta[self.path].encode())
                self._reply(404)

        return Handler
