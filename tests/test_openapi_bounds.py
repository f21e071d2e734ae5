"""Every request body the REST API documents is bounded in its schema (docs/openapi.json): each string has a
maxLength (or is an enum or a date-time), each array a maxItems, each object with free keys a maxProperties,
each number a maximum; names declare their pattern. So is every path and query parameter, and a name in a
path declares the name pattern (tests/test_api_trust.py shows the app enforces those bounds). Clients and
fuzzers then know what the API accepts, and nothing unbounded reaches the service (the 1 MiB body cap is the
last line, not the first)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# What api/rest/common.py declares (NAME_PATTERN, QUALIFIED_NAME_PATTERN), as literals: the document is what
# clients read, and this file stays free of the app's imports.
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
QUALIFIED_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?$"

OPENAPI_DOC = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def unbounded(schema: dict[str, Any], where: str, schemas: dict[str, Any], seen: frozenset[str]) -> Iterator[str]:
    """Where `schema` (and what it holds) leaves a string, array, object or number without a bound."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name not in seen:
            yield from unbounded(schemas[name], f"{where}->{name}", schemas, seen | {name})
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key, []):
            yield from unbounded(option, where, schemas, seen)
    kind = schema.get("type")
    if kind == "string" and not ({"maxLength", "enum", "const"} & schema.keys()) \
            and schema.get("format") not in ("date-time", "date"):
        yield f"{where}: string without maxLength"
    elif kind == "array":
        if "maxItems" not in schema:
            yield f"{where}: array without maxItems"
        yield from unbounded(schema.get("items", {}), f"{where}[]", schemas, seen)
    elif kind == "object":
        for name, value in schema.get("properties", {}).items():
            yield from unbounded(value, f"{where}.{name}", schemas, seen)
        extra = schema.get("additionalProperties")
        if extra not in (None, False) and "maxProperties" not in schema:
            yield f"{where}: object with free keys but no maxProperties"
        if isinstance(extra, dict):
            yield from unbounded(extra, f"{where}{{}}", schemas, seen)
        names = schema.get("propertyNames")
        if isinstance(names, dict):
            yield from unbounded(names, f"{where}{{key}}", schemas, seen)
    elif kind in ("integer", "number") and not ({"maximum", "exclusiveMaximum"} & schema.keys()):
        yield f"{where}: number without maximum"


def request_bodies(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody")
            if body:
                yield f"{method.upper()} {path}", body["content"]["application/json"]["schema"]


def test_every_request_body_is_bounded() -> None:
    document = json.loads(OPENAPI_DOC.read_text())
    schemas = document["components"]["schemas"]
    bodies = list(request_bodies(document))
    assert len(bodies) >= 15, "the walk found the API's request bodies"
    problems = [problem for route, schema in bodies for problem in unbounded(schema, route, schemas, frozenset())]
    assert problems == [], "\n".join(problems)


def parameters(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                yield f"{method.upper()} {path} {parameter['in']} {parameter['name']}", parameter


def test_every_path_and_query_parameter_is_bounded() -> None:
    """A URL is not covered by the body cap: each string parameter declares its maxLength, each number its
    maximum (a VM's `{vm:path}`, a job id, the jobs list's filters, a console's max_bytes, a watch's timeout)."""
    document = json.loads(OPENAPI_DOC.read_text())
    found = list(parameters(document))
    assert sum(1 for _, parameter in found if parameter["in"] == "path") >= 45, "the walk found the path parameters"
    problems = [problem for where, parameter in found
                for problem in unbounded(parameter["schema"], where, document["components"]["schemas"], frozenset())]
    assert problems == [], "\n".join(problems)


def test_names_declare_their_pattern() -> None:
    document = json.loads(OPENAPI_DOC.read_text())
    schemas = document["components"]["schemas"]
    name = schemas["SiteIn"]["properties"]["name"]
    assert name["maxLength"] == 64 and name["pattern"] == NAME_PATTERN, name
    # Names and 'server/cloud' references in bodies, and every identifier in a path.
    for schema, field in (("ProtectIn", "policy"), ("HostIn", "cloud"), ("NetworkMappingIn", "cloud")):
        declared = schemas[schema]["properties"][field]
        options = declared.get("anyOf", [declared])
        assert all(option.get("pattern") in (NAME_PATTERN, QUALIFIED_NAME_PATTERN)
                   for option in options if option.get("type") == "string"), (schema, field, declared)
    for where, parameter in parameters(document):
        if parameter["in"] == "path":
            assert parameter["schema"].get("pattern") in (NAME_PATTERN, QUALIFIED_NAME_PATTERN), where


def test_the_walk_finds_what_is_unbounded() -> None:
    """The check itself can fail: each kind of gap in a made-up schema is found."""
    schema = {"type": "object", "properties": {
        "s": {"type": "string"}, "a": {"type": "array", "items": {"type": "string", "maxLength": 3}},
        "o": {"type": "object", "additionalProperties": True}, "n": {"type": "integer"},
        "ok": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}}}
    assert sorted(unbounded(schema, "X", {}, frozenset())) == [
        "X.a: array without maxItems", "X.n: number without maximum",
        "X.o: object with free keys but no maxProperties", "X.s: string without maxLength"]
