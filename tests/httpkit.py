"""A real HTTP file server on 127.0.0.1 for the tests and the bench: serves a folder, honours Range requests
(206 with Content-Range), counts the requests and body bytes it sends, and injects faults on request: statuses
to answer a path with before serving it (two 500s then 200), a stall (no answer for some seconds), a stop and a
restart on the same port."""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class FileServer:
    def __init__(self, root: Path, port: int = 0):
        self.root = Path(root)
        self.port = port
        self.sent = 0  # body bytes sent
        self.requests: Counter = Counter()  # path -> requests
        self.faults: dict[str, list[int]] = {}  # path -> statuses to answer first, in order
        self.stalls: dict[str, float] = {}  # path -> seconds to wait before answering
        # path -> byte offset: the first request for that path reading from there on (past its header) stops the
        # server, unanswered: a server gone mid-run
        self.stop_at: dict[str, int] = {}
        self.headers_seen: list[dict] = []
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.down = False  # stopped: connections kept alive from before are closed unanswered too
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        server = self
        self.down = False

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0].lstrip("/")
                if path == "__counts":  # for a server in another process (the bench): what it has sent
                    data = json.dumps({"sent": server.sent, "requests": sum(server.requests.values())}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if path == "__reset":
                    server.reset_counts()
                    return self.empty(204)
                if server.down:
                    self.close_connection = True
                    return
                with server.lock:
                    server.requests[path] += 1
                    server.headers_seen.append(dict(self.headers))
                    queued = server.faults.get(path)
                    status = queued.pop(0) if queued else None
                if path in server.stalls:
                    time.sleep(server.stalls[path])
                found = _RANGE.match((self.headers.get("Range") or "").strip())
                if path in server.stop_at and found and int(found.group(1) or 0) >= server.stop_at[path]:
                    del server.stop_at[path]
                    threading.Thread(target=server.stop, daemon=True).start()
                    self.close_connection = True
                    return
                if status is not None:
                    return self.empty(status)
                file = (server.root / path).resolve()
                if not file.is_file() or server.root.resolve() not in file.parents:
                    return self.empty(404)
                size = file.stat().st_size  # only the range asked for is read from the file
                start, end, code = 0, size - 1, 200
                wanted = self.headers.get("Range")
                if wanted:
                    found = _RANGE.match(wanted.strip())
                    if not found or not (found.group(1) or found.group(2)):
                        return self.empty(416)
                    if found.group(1):
                        start = int(found.group(1))
                        end = min(int(found.group(2)), size - 1) if found.group(2) else size - 1
                    else:
                        start = max(0, size - int(found.group(2)))
                    if start >= size:
                        return self.empty(416)
                    code = 206
                self.send_response(code)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if body:
                    with open(file, "rb") as f:
                        f.seek(start)
                        chunk = f.read(end - start + 1)
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    with server.lock:
                        server.sent += len(chunk)

            def empty(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.down = True
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def reset_counts(self) -> None:
        with self.lock:
            self.sent = 0
            self.requests.clear()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # python tests/httpkit.py ROOT: serves ROOT, prints its URL (the bench's server process)
    served = FileServer(Path(sys.argv[1]))
    print(served.url, flush=True)
    threading.Event().wait()
