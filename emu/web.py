"""What the project's two local web pages share: the rating page (emu/evaluation/rating.py) and the
demo's image editor (emu/demo/editor.py). Standard library only (`http.server`).

A LocalServer listens on loopback unless told otherwise and knows the names it may be reached by. A
SafeHandler answers only fixed routes and trusts nothing in a request:
- the Host header: on a loopback address only localhost names are served (DNS rebinding);
- the origin of a POST: it needs an Origin (or Referer) of this server, so no other site can post;
- the body: its type and length are checked before it is read, its size is capped;
- errors: a 4xx with a one-line message; an unexpected error gets a 500 and one line in the log,
  never a traceback sent to the browser.
Every answer carries a Content-Security-Policy that allows only the server's own images, style sheet
and script, so even a missed escape of user text could not run a script.
"""
import ipaddress
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # A rater's token is in the URL: send it to no other site. ("no-referrer" would also make the browser
    # send "Origin: null" with our own form posts, and the origin check needs the real one.)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class BadRequest(Exception):
    """Answered as `status` with the message as one line of text."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class LocalServer(ThreadingHTTPServer):
    """A threading HTTP server that knows whether it is on loopback and which Host names reach it."""
    daemon_threads = True

    def __init__(self, host, port, handler):
        super().__init__((host, port), handler)
        port = self.server_address[1]
        self.loopback = ipaddress.ip_address(self.server_address[0]).is_loopback
        self.allowed_hosts = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
        self.base_url = f"http://{'127.0.0.1' if self.loopback else host}:{port}"


class SafeHandler(BaseHTTPRequestHandler):
    """Routes GET and POST through the `get_routes` and `post_routes` dicts (path -> method) of a
    subclass; every other method gets a 405."""
    server_version = "emu"
    default_request_version = "HTTP/1.0"  # so that even a malformed request line gets a status line back
    get_routes, post_routes = {}, {}

    def version_string(self):
        return self.server_version

    # -- answers ----------------------------------------------------------------

    def send(self, status, body, content_type="text/html; charset=utf-8", headers=None):
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        for k, v in {**SECURITY_HEADERS, "Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_text(self, status, text, headers=None):
        self.send(status, f"{text}\n", "text/plain; charset=utf-8", headers)

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (malformed request line, unknown method) in our plain form."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method nobody implements is still the client's mistake
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, None
        self.send_text(code, f"{code} {message or HTTPStatus(code).phrase}")

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {self.redact(format % args)}\n")

    def redact(self, line):
        """What of a request line may be logged (the rating page hides its tokens)."""
        return line

    # -- routing ----------------------------------------------------------------

    def handle_safely(self, route):
        try:
            self.check_host()
            route()
        except BadRequest as e:
            self.send_text(e.status, f"{e.status} {e}")
        except Exception as e:  # a bug: answer 500, keep serving, one line in the log
            sys.stderr.write(f"error: {self.command} {urlsplit(self.path).path}: {type(e).__name__}: {e}\n")
            self.send_text(500, "500 internal error")

    def do_GET(self):
        route = self.get_routes.get(urlsplit(self.path).path)
        self.handle_safely(self.not_found if route is None else lambda: route(self))

    def do_POST(self):
        route = self.post_routes.get(urlsplit(self.path).path)
        self.handle_safely(self.not_found if route is None else lambda: (self.check_origin(), route(self)))

    def refuse_method(self):
        self.handle_safely(lambda: self.send_text(405, "405 method not allowed", {"Allow": "GET, POST"}))

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = refuse_method

    def not_found(self):
        raise BadRequest(404, "not found")

    # -- checks -----------------------------------------------------------------

    def check_host(self):
        host = self.headers.get("Host", "")
        if self.server.loopback and host not in self.server.allowed_hosts:
            raise BadRequest(400, "unknown Host")

    def check_origin(self):
        """A POST must come from a page of this server (no cross-site posts)."""
        own = f"http://{self.headers.get('Host', '')}"
        origin = self.headers.get("Origin")
        if origin is None and self.headers.get("Referer"):
            parts = urlsplit(self.headers["Referer"])
            origin = f"{parts.scheme}://{parts.netloc}"
        if origin != own:
            raise BadRequest(403, "cross-origin or origin-less request refused")

    def query(self):
        try:
            return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, strict_parsing=False).items()}
        except ValueError:
            raise BadRequest(400, "bad query string") from None

    def read_body(self, max_bytes, content_types=None):
        """The request's body as bytes: its Content-Type one of `content_types` (any when None), its
        Content-Length given and at most `max_bytes`."""
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_types is not None and kind not in content_types:
            raise BadRequest(415, f"expected {' or '.join(content_types)}, not {kind or 'no Content-Type'}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest(411, "Content-Length required") from None
        if not 0 <= length <= max_bytes:
            raise BadRequest(413, f"body too large (at most {max_bytes} bytes)")
        return self.rfile.read(length)

    def read_form(self, max_bytes):
        """A form-encoded body as {name: value}."""
        body = self.read_body(max_bytes, ("application/x-www-form-urlencoded",))
        try:
            return {k: v[0] for k, v in parse_qs(body.decode("ascii"), strict_parsing=True, keep_blank_values=True).items()}
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(400, "malformed form") from None
