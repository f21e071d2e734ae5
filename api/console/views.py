"""Rendering the console's pages: the Jinja2 templates in api/console/templates (autoescaped), the filters they
format times, durations and sizes with, and the headers every console answer carries (no caching of pages
holding a deployment's state, no framing, scripts and styles from this server only)."""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from .auth import ConsoleUser

HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    # Every script and style is a file of this package (no inline script, no CDN); nothing may frame the console.
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _when(value: str | None) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM:SS UTC'."""
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours < 48 else f"{hours // 24} d {hours % 24} h"


def _size(count: int | None) -> str:
    if count is None:
        return "—"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _rpo_level(entry: dict[str, Any]) -> str:
    """'ok', 'warning' or 'critical': the RPO against the thresholds its policy holds it to."""
    rpo = entry.get("rpo_s")
    if rpo is None:
        return "unknown"
    if entry.get("rpo_critical_s") is not None and rpo >= entry["rpo_critical_s"]:
        return "critical"
    if entry.get("rpo_warning_s") is not None and rpo >= entry["rpo_warning_s"]:
        return "warning"
    return "ok"


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(when=_when, duration=_duration, size=_size)
templates.env.globals.update(rpo_level=_rpo_level)


def render(request: Request, name: str, user: ConsoleUser | None, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """The page `name` for `user` (its role decides which actions it shows; its CSRF token goes into forms)."""
    response = templates.TemplateResponse(request, name, {"user": user, **context}, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response
