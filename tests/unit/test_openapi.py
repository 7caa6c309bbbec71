"""The OpenAPI document: valid OpenAPI 3.1, every route in it and only routes,
its examples true to its schemas, and served at ``/api/v1/openapi.json``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from klein import Klein
from openapi_spec_validator import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from treq.testing import StubTreq
from werkzeug.routing import Map

from sna.api import openapi
from sna.api.app import SnaAPI
from sna.api.auth import BearerTokenAuthorization
from sna.testing import result_of
from tests.unit.conftest import Harness

DOCS = Path(__file__).resolve().parents[2] / "docs" / "SNA-API.md"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_CONVERTER = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def routes(url_map: Map) -> set[tuple[str, str]]:
    """Every (METHOD, path) a Klein app routes, paths written as OpenAPI writes them.

    ``HEAD`` that werkzeug adds to every ``GET`` route is left out: the
    document says once, in its description, that ``HEAD`` goes wherever ``GET`` does.
    """
    found: set[tuple[str, str]] = set()
    for rule in url_map.iter_rules():
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        methods = set(rule.methods or ())
        if "GET" in methods:
            methods.discard("HEAD")
        methods.discard("OPTIONS")
        found.update((method, path) for method in methods)
    return found


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def mismatch(url_map: Map, document: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(routes the document lacks, documented operations no route serves)."""
    served, described = routes(url_map), documented(document)
    return (
        {f"{m} {p}" for m, p in served - described},
        {f"{m} {p}" for m, p in described - served},
    )


# -- the document ----------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi.document()
    assert document["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(document).validate()


def test_every_route_is_documented_and_every_documented_path_is_a_route() -> None:
    undocumented, unserved = mismatch(SnaAPI.app.url_map, openapi.document())
    assert undocumented == set(), (
        "routes missing from sna/api/openapi.py (add a PATHS entry for each): "
        + ", ".join(sorted(undocumented))
    )
    assert unserved == set(), "documented operations no route serves: " + ", ".join(
        sorted(unserved)
    )


def test_the_comparison_finds_an_undocumented_route_and_a_stale_path() -> None:
    # The completeness test above must be able to fail: a route added to an
    # app without a PATHS entry, and a PATHS entry whose route went away.
    class Grown:
        app = Klein()

        @app.route("/api/v1/things/<thing_id>/log", methods=["GET"])
        def log(self, request: Any, thing_id: str) -> bytes:  # pragma: no cover - never called
            return b""

        @app.route("/api/v1/health", methods=["GET", "POST"])
        def health(self, request: Any) -> bytes:  # pragma: no cover - never called
            return b""

    document = {
        "paths": {
            "/api/v1/health": {"get": {}, "parameters": []},
            "/api/v1/gone": {"delete": {}},
        }
    }
    assert mismatch(Grown.app.url_map, document) == (
        {"GET /api/v1/things/{thing_id}/log", "POST /api/v1/health"},
        {"DELETE /api/v1/gone"},
    )


def test_the_route_table_of_the_api_docs_matches_the_document() -> None:
    # docs/SNA-API.md lists every route at its top; it and the document move together.
    table = re.findall(
        r"^\| `([A-Z]+)` \| \[`([^`]+)`\]", DOCS.read_text(encoding="utf-8"), re.MULTILINE
    )
    assert table, "no route table found in docs/SNA-API.md"
    assert set(table) == documented(openapi.document())


def test_every_generic_error_of_the_docs_is_in_every_operation() -> None:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Generic errors", 1)[1].split("\n## ", 1)[0]
    generic = set(re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", section, re.MULTILINE))
    assert len(generic) > 20
    body_only = {("400", "invalid_json"), ("400", "json_too_deep"), ("400", "invalid_request")}
    body_only.add(("415", "unsupported_media_type"))
    for path, method, op in operations(openapi.document()):
        codes = {
            (status, code)
            for status, response in op["responses"].items()
            if status[0] in "45"
            for code in error_codes(response)
        }
        expected = generic if "requestBody" in op else generic - body_only
        # The control-character check applies where a request carries text.
        assert expected - {("400", "invalid_request")} <= codes, (method, path)


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def error_codes(response: dict[str, Any]) -> list[str]:
    schema = response["content"]["application/json"]["schema"]
    codes: list[str] = schema["properties"]["error"]["enum"]
    return codes


def test_every_error_body_is_described_with_its_codes() -> None:
    document = openapi.document()
    for path, method, op in operations(document):
        assert "200" in op["responses"] or "202" in op["responses"], (method, path)
        for status, response in op["responses"].items():
            if status[0] not in "45":
                continue
            codes = error_codes(response)
            assert codes, (method, path, status)
            validator = validator_for(
                document,
                *("paths", path, method, "responses", status),
                *("content", "application/json", "schema"),
            )
            body = {"error": codes[0], "message": "why", "field": "vm_name"}
            assert validator.is_valid(body)
            assert not validator.is_valid({**body, "error": "no_such_code"})
            assert not validator.is_valid({"error": codes[0]})


def test_the_routes_open_without_a_token_are_the_ones_the_document_says(
    harness: Harness,
) -> None:
    # Asked of the real authorization in front of the API: an operation marked
    # `security: [{}]` is answered without a token, every other one is 401.
    stub = StubTreq(BearerTokenAuthorization(harness.api.resource(), b"t0ken"))
    document = openapi.document()
    assert {"bearer": []} in document["security"]
    for path, method, op in operations(document):
        if path == "/api/v1/progress/{job_id}/update":
            continue  # open from loopback only: the document cannot say "from where"
        url = "http://sna" + re.sub(r"\{[^}]+\}", "x", path)
        response = result_of(stub.request(method.upper(), url))
        result_of(response.content())
        said_open = op.get("security") == [{}]
        assert (response.code != 401) == said_open, (method, path, response.code)


def test_operation_ids_are_unique() -> None:
    ids = [op["operationId"] for _, _, op in operations(openapi.document())]
    assert len(ids) == len(set(ids))


# -- examples ------------------------------------------------------------------------


def validator_for(document: dict[str, Any], *place: str) -> Draft202012Validator:
    """A validator of the schema at ``place`` (keys from the root) of the document,
    whose ``#/components/...`` references resolve within the document."""
    root = "urn:sna-openapi"
    registry: Registry[Any] = Registry().with_resource(
        root, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    pointer = "".join("/" + key.replace("~", "~0").replace("/", "~1") for key in place)
    return Draft202012Validator({"$ref": f"{root}#{pointer}"}, registry=registry)


def examples(node: Any, place: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (place of its schema, example) of the document: ``examples`` in
    schemas, ``example`` in media types and parameters."""
    if isinstance(node, dict):
        # A list: JSON Schema's examples (OpenAPI's own "examples" are a map).
        if isinstance(node.get("examples"), list):
            for example in node["examples"]:
                yield place, example
        if "example" in node and isinstance(node.get("schema"), dict):
            yield (*place, "schema"), node["example"]
        for key, value in node.items():
            yield from examples(value, (*place, key))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from examples(value, (*place, str(n)))


def test_every_example_validates_against_its_schema() -> None:
    document = openapi.document()
    found = list(examples(document))
    assert len(found) >= 8
    for place, example in found:
        problems = [e.message for e in validator_for(document, *place).iter_errors(example)]
        assert problems == [], "/".join(place)


def test_a_wrong_example_is_caught() -> None:
    document = openapi.document()
    place = ("paths", "/api/v1/health", "get", "responses", "200", "content")
    validator = validator_for(document, *place, "application/json", "schema")
    good = document["paths"]["/api/v1/health"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]["examples"][0]
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "jobs": {**good["jobs"], "running": -1}})
    assert not validator.is_valid({**good, "timestamp": "2026-11-26T09:32:04.123Z"})


# -- the route -------------------------------------------------------------------------


def test_the_document_is_served(harness: Harness) -> None:
    code, body = harness.request("GET", "/api/v1/openapi.json")
    assert code == 200
    assert body == json.loads(json.dumps(openapi.document()))


def test_the_document_needs_the_token_like_every_route_but_health(harness: Harness) -> None:
    stub = StubTreq(BearerTokenAuthorization(harness.api.resource(), b"t0ken"))
    response = result_of(stub.get("http://sna/api/v1/openapi.json"))
    assert response.code == 401
    response = result_of(
        stub.get("http://sna/api/v1/openapi.json", headers={"Authorization": "Bearer t0ken"})
    )
    assert response.code == 200
    assert json.loads(result_of(response.content()))["openapi"] == openapi.OPENAPI_VERSION


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (
            openapi.JOB_ID_PATTERN,
            ["backup-pgtest1-1764148323", "backup-SQL Server 01-1796166100", " x ", "é"],
            ["", "   ", "a/b", "a\tb", "a\x85b", "\u3000", "a\x7f"],
        ),
        (openapi.SAFE_TEXT, ["", "my vm", "Ωmega"], ["a\nb", "\x1b[31m", "a\x9fb"]),
        (openapi.MILLISECONDS, ["2026-11-26T09:12:03.481Z"], ["2026-11-26T09:12:03Z"]),
        (openapi.SECONDS, ["2026-11-26T09:12:03Z"], ["2026-11-26T09:12:03.481Z"]),
    ],
)
def test_patterns_say_what_the_daemon_checks(pattern: str, good: list[str], bad: list[str]) -> None:
    regex = re.compile(pattern)
    assert [g for g in good if not regex.search(g)] == []
    assert [b for b in bad if regex.search(b)] == []
