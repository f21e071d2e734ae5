"""The REST API: every operator operation of `api.service` over HTTP (FastAPI), served by `asr api`
(`uvicorn api.rest:app` with the deployment's TLS and forwarded-header settings: ASR_API_TRUSTED_PROXIES).

- Reads are GET, actions POST, all under /api/v1. An action that starts a job answers 202 at once with
  {"job_id", "kind", "vm"} and a Location header to /api/v1/jobs/{id}; the job is followed by polling that,
  or as server-sent events from /api/v1/jobs/{id}/events until it ends.
- Every request under /api/ needs an API key, in `X-API-Key: <key>` or `Authorization: Bearer <key>`, whose
  role (reader, operator, admin: api/rest/roles.py) is at least the route's. Both are checked before the
  request is read, so without a valid key the answer is 401, with too small a role 403, and nothing happens.
  Bodies above ASR_API_MAX_BODY_BYTES get 413 unread. /healthz, the OpenAPI document and /docs (served
  offline) are open: they hold no data.
- Errors are {"error": "<message>"}: 400 refused as asked (disabling protection without its confirmation), 401
  no or bad key, 403 role too small, 404 unknown id or name, 409 busy or wrong state or exists already, 413 body
  too large, 422 bad input (names with '/', '\\' or '..', values out of range, unknown fields), 429 too many
  failed keys from this client, 503 a passing outage.

`python -m api.rest --write-openapi docs/openapi.json` regenerates the OpenAPI document kept in docs/.
"""
from .app import app, openapi_text
from .auth import OPEN_PATHS
from .common import API_PREFIX

__all__ = ["app", "API_PREFIX", "OPEN_PATHS", "openapi_text"]
