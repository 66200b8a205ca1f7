"""A real HTTP server on 127.0.0.1 (port 0) whose answers come from a script, for the teacher tests.

``behave(n, request_json)`` returns one of
- ``(status, content_type_or_headers, body)``: ``body`` str or bytes; a str second item is the
  Content-Type, a dict is extra headers (Content-Type then defaults to JSON);
- ``("stall", seconds)``: hold the connection without answering;
- ``("trickle", body_bytes, seconds_per_byte)``: a 200 whose body arrives one byte at a time.
Every request's headers and JSON body are recorded in ``requests``; ``n`` counts them.
"""

import http.server
import json
import threading
import time

import pytest


class Loopback:
    def __init__(self, behave):
        self.behave = behave
        self.requests: list[tuple[dict, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, headers, body):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((dict(self.headers), data))
                    n = len(outer.requests)
                ans = outer.behave(n, data)
                try:
                    if ans[0] == "stall":
                        time.sleep(ans[1])
                        return
                    if ans[0] == "trickle":
                        _, body, dt = ans
                        self._send(200, {"Content-Type": "application/json"}, body)
                        for i in range(len(body)):
                            self.wfile.write(body[i:i + 1])
                            time.sleep(dt)
                        return
                    status, extra, body = ans
                    body = body.encode() if isinstance(body, str) else body
                    headers = {"Content-Type": extra} if isinstance(extra, str) else {**extra, "Content-Type": "application/json"}
                    self._send(status, headers, body)
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: fine
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def n(self) -> int:
        return len(self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    """``server(behave) -> Loopback``; every server made is closed after the test."""
    made = []

    def make(behave):
        made.append(Loopback(behave))
        return made[-1]

    yield make
    for s in made:
        s.close()
