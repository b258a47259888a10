"""The page the ingress serves locally: the built frontend (`frontend/dist`: `index.html`, its optional
`config.json` and `assets/`), or a placeholder until it is built. In production S3 and CloudFront serve
the same files."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

ROOT = Path(__file__).resolve().parents[1]

_PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CSM voice</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto">
<h1>CSM voice conversations</h1>
<p>The server is running. The page is not built yet: the realtime API is at
<code>/v1/realtime</code> (WebSocket), voices at <a href="/v1/voices">/v1/voices</a>,
status at <a href="/readyz">/readyz</a>.</p>
</body></html>
"""


def _not_found() -> JSONResponse:
    return JSONResponse({"error": "not found"}, status_code=404)


class Pages:
    """The files of one built frontend folder (default: the checkout's `frontend/dist`)."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else ROOT / "frontend" / "dist"

    def index(self) -> Response:
        page = self.folder / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(_PLACEHOLDER)

    def config(self) -> Response:
        """The page's optional settings (the endpoint); none here means the page's defaults."""
        path = self.folder / "config.json"
        return FileResponse(path) if path.is_file() else _not_found()

    def asset(self, name: str) -> Response:
        """A file under `assets/`; a name that resolves outside it (`../`, a link) is not found."""
        base = (self.folder / "assets").resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            return _not_found()
        return FileResponse(path)
