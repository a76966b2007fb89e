"""HTTP servers on 127.0.0.1 for the download tests (tests/test_checkpoint_sources.py),
started and stopped by the test: no network is used. Not a test file."""
import contextlib
import http.server
import socket
import threading
import time


class FileServer:
    """Serves ``files`` ({path: bytes}) over HTTP on 127.0.0.1; counts GETs per
    path. ``headers`` adds response headers per path; ``truncate`` paths send a
    Content-Length of the whole file but close after half of it; ``delay_s``
    slows every file down (sleep between 64 kB chunks). It stops itself after
    ``lifetime_s`` in any case."""

    def __init__(self, files, *, headers=None, truncate=(), delay_s=0.0, lifetime_s=300.0):
        self.files, self.headers, self.truncate, self.delay_s = dict(files), headers or {}, set(truncate), delay_s
        self.hits = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                for k, v in server.headers.get(path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                body = data[: len(data) // 2] if path in server.truncate else data
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i: i + (1 << 16)])
                    if server.delay_s:
                        time.sleep(server.delay_s)
                if path in server.truncate:
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime_s, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def stop(self):
        self.timer.cancel()
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join(timeout=5)
        self.httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


class LocalServer:
    """127.0.0.1, for what FileServer does not do: GET /hub/<f> answers 302 to /cdn/<f>
    with ``etag`` as X-Linked-Etag (as the Hub redirects to its CDN); /cdn/<f> serves
    ``data``; /nolength/<f> serves it without Content-Length (the end of the body is
    the end of the connection); /hangup closes without an answer. ``requests``: the
    headers of every request."""

    def __init__(self, data, etag=""):
        server = self
        self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                if self.path.startswith("/hub/"):
                    self.send_response(302)
                    self.send_header("Location", "/cdn/" + self.path[len("/hub/"):])
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path.startswith(("/cdn/", "/nolength/")):
                    self.send_response(200)
                    if self.path.startswith("/cdn/"):
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.close_connection = True
                elif self.path == "/hangup":
                    self.close_connection = True
                else:
                    self.send_error(404)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.thread.join(timeout=5)
        self.httpd.server_close()


class StallingServer:
    """127.0.0.1: answers every request with ``head`` (bytes: nothing, or a status
    line, headers and the start of a body) and then stalls, the connection held
    open, until stop()."""

    def __init__(self, head):
        self.head, self.conns, self.done = head, [], threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(self.head)

    def stop(self):
        self.done.set()
        self.thread.join(timeout=5)
        for c in self.conns:
            c.close()
        self.sock.close()
