"""Regenerate ``tests/data/openai_schemas.json`` from OpenAI's OpenAPI spec.

Usage::

    python tests/data/extract_openai_schemas.py /path/to/openai-openapi.yaml [out.json]

Keeps the component schemas our tests validate bodies against plus everything they transitively ``$ref``, with
documentation-only keys (descriptions, examples, ``x-oaiMeta``) dropped. A dev-time script: the tests read only the
JSON it writes, never the spec. Needs PyYAML.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = [
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "Model",
    "Error",
    "ErrorResponse",
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "CreateEmbeddingRequest",
    "CreateEmbeddingResponse",
    "CreateResponse",
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
    "TokenCountsBody",
    "TokenCountsResource",
]
DROP = frozenset({"description", "example", "examples", "x-oaiMeta"})
REF_PREFIX = "#/components/schemas/"


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in DROP}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    if not isinstance(node, str | int | float | bool | type(None)):
        return str(node)  # YAML dates and the like
    return node


def _refs(node: Any) -> list[str]:
    found: list[str] = []
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            ref = cur.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF_PREFIX):
                found.append(ref[len(REF_PREFIX) :])
            stack.extend(v for k, v in cur.items() if k != "$ref")
        elif isinstance(cur, list):
            stack.extend(cur)
    return found


def extract(spec: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_refs(schemas[name]))
    return {name: _strip(schemas[name]) for name in sorted(seen)}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[2]) if len(argv) == 3 else Path(__file__).with_name("openai_schemas.json")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(argv[1], encoding="utf-8") as fh:
        spec = yaml.load(fh, Loader=loader)  # a safe loader
    doc = {"source": Path(argv[1]).name, "roots": ROOTS, "schemas": extract(spec, ROOTS)}
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(doc['schemas'])} schemas, {out.stat().st_size} bytes to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
