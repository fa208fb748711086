"""Validate response (and request) bodies against OpenAI's own component schemas.

The schemas are extracted once from the official OpenAPI spec into ``tests/data/openai_schemas.json`` (see
``tests/data/extract_openai_schemas.py``); this module never reads the spec itself. OpenAPI 3.0's
``nullable: true`` (which OpenAI's 3.1 document still uses) is rewritten on load so that such a schema also accepts
``null``, then every body is checked with a Draft 2020-12 validator, ``#/components/schemas/X`` refs resolved
against the same document.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["SchemaValidationError", "schema_names", "validate"]

DATA = Path(__file__).parent / "data" / "openai_schemas.json"
_ROOT_URI = "urn:openai-openapi"


class SchemaValidationError(AssertionError):
    """A body does not match its OpenAI schema."""


def _nullable(node: Any) -> Any:
    """Rewrite OpenAPI 3.0 ``nullable: true`` into JSON Schema, recursively."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is not True:
        return out
    typ = out.get("type")
    if isinstance(typ, str):
        out["type"] = [typ, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if "const" in out:
            return {"anyOf": [{"type": "null"}, out]}
        return out
    if isinstance(typ, list):
        if "null" not in typ:
            out["type"] = [*typ, "null"]
        return out
    # No plain type (oneOf/anyOf/allOf/$ref...): accept null beside whatever the schema accepts.
    return {"anyOf": [{"type": "null"}, out]}


@cache
def _document() -> dict[str, Any]:
    raw = json.loads(DATA.read_text(encoding="utf-8"))
    return {"components": {"schemas": _nullable(raw["schemas"])}}


@cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = Resource.from_contents(_document(), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_ROOT_URI, resource)
    return registry


@cache
def _validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in _document()["components"]["schemas"]:
        raise KeyError(f"no OpenAI schema named {schema_name!r} in {DATA.name}")
    schema = {"$ref": f"{_ROOT_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(schema, registry=_registry())


def schema_names() -> list[str]:
    return sorted(_document()["components"]["schemas"])


def validate(schema_name: str, body: object) -> None:
    """Raise :class:`SchemaValidationError` (an AssertionError) unless ``body`` matches OpenAI's ``schema_name``."""
    validator = _validator(schema_name)
    errors = list(validator.iter_errors(body))
    if not errors:
        return
    err = best_match(errors)
    where = "/".join(str(p) for p in err.absolute_path) or "<root>"
    lines = [f"body does not match OpenAI schema {schema_name!r}: at {where}: {err.message}"]
    for sub in sorted(err.context or (), key=lambda e: len(e.absolute_path))[:5]:
        sub_where = "/".join(str(p) for p in sub.absolute_path) or "<root>"
        lines.append(f"  - at {sub_where}: {sub.message}")
    if len(errors) > 1:
        lines.append(f"  ({len(errors) - 1} more error(s))")
    raise SchemaValidationError("\n".join(lines))
