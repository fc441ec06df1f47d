"""A real uvicorn server on 127.0.0.1 on a free port, in a thread of the test process, for the service's tests, with
the settings `duch serve` gives it (the header deadline, keep-alive)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from duch.pipeline.serve.limits import server_options


@contextlib.contextmanager
def running(app):
    """`with running(app) as base:` the app served at `base` (http://127.0.0.1:PORT) until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           **server_options(app.state.service.config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
