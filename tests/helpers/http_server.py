"""A web server on 127.0.0.1 serving a folder, for tests of remote shard folders: it counts
requests and bytes sent per path and can cut responses part-way.

    Handler = make_handler()
    with serve(folder, Handler) as url:   # e.g. http://127.0.0.1:41234
        ...
    Handler.requests["/sizes.json"], Handler.sent["/manifest.json"]
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """``drops[path] = n`` cuts the next n responses for that path after half of its bytes
    (Content-Length promises all of them); ``requests[path]``: GET requests seen;
    ``sent[path]``: file bytes sent in full responses."""

    drops: dict[str, int]
    requests: dict[str, int]
    sent: dict[str, int]

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        cls = type(self)
        cls.requests[self.path] = cls.requests.get(self.path, 0) + 1
        if cls.drops.get(self.path, 0) > 0:
            cls.drops[self.path] -= 1
            with open(self.translate_path(self.path), "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()

    def copyfile(self, source, outputfile):
        n = os.fstat(source.fileno()).st_size - source.tell()
        type(self).sent[self.path] = type(self).sent.get(self.path, 0) + n
        super().copyfile(source, outputfile)


def make_handler() -> type[_CountingHandler]:
    """A handler class with its own (empty) ``drops``, ``requests`` and ``sent``."""
    return type("Handler", (_CountingHandler,), {"drops": {}, "requests": {}, "sent": {}})


def reset(handler: type[_CountingHandler]) -> None:
    """Forget the drops and counts of ``handler``."""
    for d in (handler.drops, handler.requests, handler.sent):
        d.clear()


@contextlib.contextmanager
def serve(folder: str, handler: type[_CountingHandler] | None = None):
    """Serve ``folder`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = handler or make_handler()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=folder))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
