"""Local servers standing in for what cannot be reached here, spoken to by the real clients (boto3,
the bridge's http.client, the Responder's httpx): AWS JSON APIs (Secrets Manager, SSM, a Cognito JWKS
document), an ingress whose behaviour a test chooses (down, slow, forgetful) for the bridge's failure
paths, and an OpenAI-compatible chat server that can be slow or broken."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Route = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


@contextmanager
def http_server(route: Route) -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """Serve `route(method, path, headers, body) -> (status, headers, body)` on loopback; yields the base
    URL and the list of requests received (method, path, body)."""
    seen: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, body))
            status, headers, payload = route(self.command, self.path, dict(self.headers), body)
            self.send_response(status)
            for name, value in {"Content-Length": str(len(payload)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _any

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def aws_json_api(values: dict[str, str]) -> Route:
    """Secrets Manager `GetSecretValue` and SSM `GetParameter` (the AWS JSON 1.1 protocol)."""

    def route(method: str, path: str, headers: dict[str, str], body: bytes):
        target = headers.get("X-Amz-Target", "")
        request = json.loads(body or b"{}")
        if target == "secretsmanager.GetSecretValue" and request["SecretId"] in values:
            answer = {
                "ARN": request["SecretId"],
                "Name": "token",
                "SecretString": values[request["SecretId"]],
            }
        elif target == "AmazonSSM.GetParameter" and request["Name"] in values:
            answer = {
                "Parameter": {
                    "Name": request["Name"],
                    "Type": "SecureString",
                    "Value": values[request["Name"]],
                }
            }
        else:
            error = {"__type": "ResourceNotFoundException", "message": f"nothing for {target}"}
            return 400, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(error).encode()
        return 200, {"Content-Type": "application/x-amz-json-1.1"}, json.dumps(answer).encode()

    return route


class FakeIngress:
    """The ingress's bridge endpoints with a chosen failure: `mode` is "ok", "slow" (events hang for
    `delay_s`), "unavailable" (events get 503) or "forgetful" (events get 404: it restarted)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 0.0

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        json_type = {"Content-Type": "application/json"}
        if method == "POST" and not path.endswith("/events"):
            return 200, json_type, b'{"conversation_id": "conv_fake"}'
        if method == "DELETE":
            return 200, json_type, b'{"conversation_id": "conv_fake"}'
        if self.mode == "slow":
            time.sleep(self.delay_s)
        if self.mode == "unavailable":
            return 503, json_type, b'{"error": "no replica"}'
        if self.mode == "forgetful":
            return 404, json_type, b'{"error": "unknown connection"}'
        return 200, json_type, b'{"conversation_id": "conv_fake"}'


class FakeLLM:
    """`POST /v1/chat/completions` streamed as OpenAI's SSE; `mode`: "ok", "slow" (answers after
    `delay_s`) or "error" (HTTP 500)."""

    def __init__(self, reply: str = "Fine, thanks. And you?") -> None:
        self.reply = reply
        self.mode = "ok"
        self.delay_s = 0.0

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        if self.mode == "slow":
            time.sleep(self.delay_s)
        if self.mode == "error":
            error = {"error": {"message": "The server is overloaded", "type": "server_error"}}
            return 500, {"Content-Type": "application/json"}, json.dumps(error).encode()
        events = []
        for word in self.reply.split(" "):
            choice = {"index": 0, "delta": {"content": word + " "}, "finish_reason": None}
            events.append({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})
        stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return 200, {"Content-Type": "text/event-stream"}, stream.encode()
