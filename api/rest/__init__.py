"""The REST API: every operator operation of `api.service` over HTTP (FastAPI), served by
`uvicorn api.rest:app`.

- Reads are GET, actions POST, all under /api/v1. An action that starts a job answers 202 at once with
  {"job_id", "kind", "vm"} and a Location header to /api/v1/jobs/{id}; the job is followed by polling that,
  or as server-sent events from /api/v1/jobs/{id}/events until it ends.
- Every request under /api/ needs an API key, in `X-API-Key: <key>` or `Authorization: Bearer <key>`. It is
  checked before the request is read, so without a valid key the answer is 401 and nothing happens. /healthz
  and the OpenAPI document and its viewers (/openapi.json, /docs, /redoc) are open: they hold no data.
- Errors are {"error": "<message>"}: 401 no or bad key, 404 unknown id or name, 409 busy or wrong state or
  exists already, 422 bad input (names with '/', '\\' or '..', values out of range, unknown fields), 503 a
  passing outage.

`python -m api.rest --write-openapi docs/openapi.json` regenerates the OpenAPI document kept in docs/.
"""
from .app import app, openapi_text
from .auth import OPEN_PATHS
from .common import API_PREFIX

__all__ = ["app", "API_PREFIX", "OPEN_PATHS", "openapi_text"]
