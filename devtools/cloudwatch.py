"""A local stand-in for CloudWatch's `PutMetricData`, for the unmodified boto3 client.

boto3 finds it through `AWS_ENDPOINT_URL_CLOUDWATCH`. It speaks the protocol botocore picks for CloudWatch
(AWS JSON 1.0: `POST /` with `X-Amz-Target: GraniteServiceVersion20100801.PutMetricData`), checks the SigV4
signature as AWS does (`devtools.sigv4`) and keeps each accepted call. A bad signature gets AWS's 403 with
its error type; any other operation, 400.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from devtools.sigv4 import SignatureRefused, verify

SERVICE = "monitoring"  # CloudWatch's SigV4 signing name
_TARGET = "GraniteServiceVersion20100801."  # the prefix of X-Amz-Target
_JSON = "application/x-amz-json-1.0"


@dataclass(frozen=True)
class Call:
    operation: str
    access_key: str
    params: dict


class LocalCloudWatch:
    """`with LocalCloudWatch(credentials) as cw:` serves on loopback at `cw.url`; `cw.calls` fills in."""

    def __init__(self, credentials: Mapping[str, str]) -> None:
        self.credentials = dict(credentials)
        self.calls: list[Call] = []
        self.refused: list[str] = []  # the error types of refused requests
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalCloudWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        try:
            key = verify(
                method, f"http://{headers.get('host', '')}{target}", headers, body, self.credentials, SERVICE
            )
        except SignatureRefused as refused:
            with self._lock:
                self.refused.append(refused.error_type)
            return HTTPStatus.FORBIDDEN, refused.error_type, _error(refused.error_type, refused.message)
        amz_target = headers.get("x-amz-target", "")
        operation = amz_target.removeprefix(_TARGET)
        if target != "/" or operation != "PutMetricData":
            return (
                HTTPStatus.BAD_REQUEST,
                "InvalidAction",
                _error("InvalidAction", f"no action {amz_target!r}"),
            )
        if headers.get("content-encoding") == "gzip":  # botocore compresses large metric batches
            body = gzip.decompress(body)
        with self._lock:
            self.calls.append(Call(operation, key, json.loads(body or b"{}")))
        return HTTPStatus.OK, "", b"{}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, error_type, payload = stand_in._handle("POST", self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Type", _JSON)
                self.send_header("Content-Length", str(len(payload)))
                if error_type:
                    self.send_header("x-amzn-ErrorType", error_type)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args) -> None:  # the tests' output stays clean
                pass

        return Handler


def _error(error_type: str, message: str) -> bytes:
    return json.dumps({"__type": error_type, "message": message}).encode()
