"""The demo's HTTP server (the standard library's): `GET /` the page, `GET /api/info` what the
loaded run can do, `POST /api/{classes,caption,read,text}` a JSON request each. A refused
request is HTTP 400 with `{"error": message}`; anything else that goes wrong in one request is
HTTP 500 with its one-line message, logged with its traceback; the server keeps serving."""

from __future__ import annotations

import http.server
import importlib.resources
import json
import traceback

from absl import logging

from monoformer_jax.demo.fields import BadRequest

MAX_BODY_BYTES = 5_000_000  # a 280x280 canvas as a PNG data URL is well under 100 kB
ROUTES = {
    "/api/classes": "draw_classes",
    "/api/caption": "draw_caption",
    "/api/read": "read_drawing",
    "/api/text": "continue_text",
}


def page_html() -> bytes:
  return importlib.resources.files(__package__).joinpath("page.html").read_bytes()


class DemoHandler(http.server.BaseHTTPRequestHandler):
  """One request; `self.server.service` is the DemoService."""

  server_version = "monoformer_jax-demo"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin  # the base class's name
    logging.info("%s %s", self.address_string(), format % args)

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, payload: dict) -> None:
    self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

  def do_GET(self):  # pylint: disable=invalid-name  # http.server's name
    path = self.path.split("?", 1)[0]
    if path in ("/", "/index.html"):
      self._send(200, page_html(), "text/html; charset=utf-8")
    elif path == "/api/info":
      self._json(200, self.server.service.info())
    else:
      self._json(404, {"error": f"no such page {path!r}"})

  def do_POST(self):  # pylint: disable=invalid-name
    path = self.path.split("?", 1)[0]
    if path not in ROUTES:
      self._json(404, {"error": f"no such request {path!r} (requests: {', '.join(ROUTES)})"})
      return
    try:
      request = self._read_request()
      answer = getattr(self.server.service, ROUTES[path])(request)
    except BadRequest as e:
      self._json(400, {"error": str(e)})
      return
    except Exception as e:  # pylint: disable=broad-except  # one request fails, never the server
      logging.error("%s failed:\n%s", path, traceback.format_exc())
      self._json(500, {"error": f"the server failed on this request ({type(e).__name__}: {str(e)[:300]})"})
      return
    self._json(200, answer)

  def _read_request(self) -> dict:
    try:
      length = int(self.headers.get("Content-Length") or 0)
    except ValueError:
      raise BadRequest("the request has no valid Content-Length") from None
    if length <= 0:
      raise BadRequest("the request is empty: send a JSON object")
    if length > MAX_BODY_BYTES:
      raise BadRequest(f"the request is {length} bytes; at most {MAX_BODY_BYTES}")
    try:
      request = json.loads(self.rfile.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise BadRequest(f"the request is not JSON ({e})") from None
    if not isinstance(request, dict):
      raise BadRequest(f"the request must be a JSON object, got {type(request).__name__}")
    return request


class DemoServer(http.server.ThreadingHTTPServer):
  """Serves `service` (a DemoService) at (host, port); port 0 picks a free one (see `url`)."""

  daemon_threads = True

  def __init__(self, service, host: str = "127.0.0.1", port: int = 8000):
    self.service = service
    super().__init__((host, port), DemoHandler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{'localhost' if host in ('0.0.0.0', '127.0.0.1') else host}:{port}/"
