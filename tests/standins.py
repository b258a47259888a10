"""Local servers standing in for what cannot be reached here, spoken to by the real clients (boto3,
the bridge's http.client, the Responder's httpx): AWS JSON APIs (Secrets Manager, SSM, a Cognito JWKS
document; ECS and SQS as the Spot drain handler uses them), an ingress whose behaviour a test chooses
(down, slow, forgetful) for the bridge's failure paths, and an OpenAI-compatible chat server that can be
slow or broken."""

from __future__ import annotations

import hashlib
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


class SpotCluster:
    """ECS and SQS as the Spot drain handler (serve_app/node_drain.py) sees them: the cluster's container
    instances and their tasks' awsvpc addresses, and the notices' queue (AWS JSON 1.1 and 1.0). Every
    request's SigV4 signature is checked against `credentials`, as AWS does; a bad one gets 403.

    `instances` maps an EC2 instance id to its tasks' addresses; `send(body)` queues a message;
    `deleted` lists the bodies of the messages deleted."""

    def __init__(self, cluster: str, instances: dict[str, list[str]], credentials: dict[str, str]) -> None:
        self.cluster, self.instances, self.credentials = cluster, instances, credentials
        self.queue: list[tuple[str, str]] = []  # (receipt handle, body), visible
        self.in_flight: dict[str, str] = {}
        self.deleted: list[str] = []
        self.calls: list[str] = []
        self._lock = threading.Condition()

    def send(self, body: str) -> None:
        with self._lock:
            self.queue.append((f"rh-{len(self.deleted) + len(self.queue) + len(self.in_flight)}", body))
            self._lock.notify_all()

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes):
        from devtools.sigv4 import SignatureRefused, verify

        lower = {k.lower(): v for k, v in headers.items()}
        target = lower.get("x-amz-target", "")
        service = "sqs" if target.startswith("AmazonSQS.") else "ecs"
        kind = "application/x-amz-json-1.0" if service == "sqs" else "application/x-amz-json-1.1"
        try:
            verify(method, f"http://{lower.get('host', '')}{path}", lower, body, self.credentials, service)
        except SignatureRefused as refused:
            return self._error(403, refused.error_type, refused.message, kind)
        operation = target.rpartition(".")[2]
        with self._lock:
            self.calls.append(operation)
        request = json.loads(body or b"{}")
        if service == "ecs" and request.get("cluster") != self.cluster:
            return self._error(400, "ClusterNotFoundException", "Cluster not found.", kind)
        handler = getattr(self, f"_{operation}", None)
        if handler is None:
            return self._error(400, "InvalidAction", f"no action {target!r}", kind)
        return 200, {"Content-Type": kind}, json.dumps(handler(request)).encode()

    def _error(self, status: int, error_type: str, message: str, kind: str):
        payload = json.dumps({"__type": error_type, "message": message}).encode()
        return status, {"Content-Type": kind, "x-amzn-ErrorType": error_type}, payload

    def _arn(self, kind: str, name: str) -> str:
        return f"arn:aws:ecs:us-east-1:000000000000:{kind}/{self.cluster}/{name}"

    def _ListContainerInstances(self, request: dict) -> dict:
        wanted = request.get("filter", "").partition("==")[2].strip()
        return {
            "containerInstanceArns": [
                self._arn("container-instance", i) for i in self.instances if i == wanted
            ]
        }

    def _ListTasks(self, request: dict) -> dict:
        instance = request["containerInstance"].rpartition("/")[2]
        addresses = self.instances.get(instance, [])
        return {"taskArns": [self._arn("task", f"{instance}-{n}") for n in range(len(addresses))]}

    def _DescribeTasks(self, request: dict) -> dict:
        tasks = []
        for arn in request["tasks"]:
            instance, _, n = arn.rpartition("/")[2].rpartition("-")
            details = [{"name": "privateIPv4Address", "value": self.instances[instance][int(n)]}]
            tasks.append(
                {"taskArn": arn, "attachments": [{"type": "ElasticNetworkInterface", "details": details}]}
            )
        return {"tasks": tasks, "failures": []}

    def _ReceiveMessage(self, request: dict) -> dict:
        with self._lock:
            # Long polling, shortened: a test need not wait 20 s to see an empty queue.
            self._lock.wait_for(
                lambda: self.queue, timeout=min(float(request.get("WaitTimeSeconds", 0)), 1.0)
            )
            taken = self.queue[: int(request.get("MaxNumberOfMessages", 1))]
            del self.queue[: len(taken)]
            self.in_flight.update(taken)
        return {
            "Messages": [
                {
                    "MessageId": handle,
                    "ReceiptHandle": handle,
                    "Body": body,
                    "MD5OfBody": hashlib.md5(body.encode()).hexdigest(),
                }
                for handle, body in taken
            ]
        }

    def _DeleteMessage(self, request: dict) -> dict:
        with self._lock:
            self.deleted.append(self.in_flight.pop(request["ReceiptHandle"]))
        return {}

    def release(self) -> None:
        """What SQS does when a message's visibility timeout ends: the undeleted are handed out again."""
        with self._lock:
            self.queue += list(self.in_flight.items())
            self.in_flight.clear()
            self._lock.notify_all()
