"""The chat page: static files from server/web/ at `GET /` and `/ui/*` (no build step).

The page and its assets are answered without an API key (a browser cannot send one for a
page load); everything it shows comes from the JSON API, with the key the user typed.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
UI_PREFIX = "/ui/"
PAGE_HEADERS = {  # the page loads only its own files: no inline script, no other origin
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def install_web_ui(app: FastAPI) -> None:
    """Serve the chat page at / and its files under /ui/ (kept out of the OpenAPI document)."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount(UI_PREFIX.rstrip("/"), StaticFiles(directory=WEB_DIR), name="ui")


def is_page_path(path: str) -> bool:
    """Whether `path` is the page or one of its files (answered without an API key)."""
    return path == "/" or path.startswith(UI_PREFIX)
