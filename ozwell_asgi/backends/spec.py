"""Backends named by a string: what ``ozwell-asgi serve --backend SPEC`` (and ``OZWELL_BACKEND``) accepts.

    echo                                   the built-in deterministic echo backend
    openai+http://host:port/v1             an OpenAI-compatible server (vLLM, Ollama, another ozwell-asgi)
    openai+https://api.openai.com/v1       the same over TLS; the key from ``upstream_key`` (--upstream-key)
    package.module:attribute               a backend object, or a factory called with no arguments
    path/to/router.toml | router.json      a router file: named backends, routes, aliases and fallbacks

A router file::

    [backends]
    local = "openai+http://127.0.0.1:11434/v1"
    cloud = { spec = "openai+https://api.openai.com/v1", key_env = "OPENAI_API_KEY" }

    [[routes]]
    model = "llama*"
    backend = "local"
    fallbacks = ["cloud"]

    [aliases]
    "gpt-4" = { model = "llama3:8b", backend = "local" }

Each backend of a router file is itself a spec (not another router file); ``key`` or ``key_env`` give its upstream
key (``key_env`` names an environment variable, so the file holds no secret). Everything is built and checked once,
at startup: a bad spec is a ``ValueError`` that says what is wrong.
"""

from __future__ import annotations

import importlib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..tokens import Tokenizer

__all__ = ["backend_from_spec"]

_UPSTREAM_SCHEMES = ("openai+http://", "openai+https://")
_ROUTER_SUFFIXES = (".toml", ".json")


def backend_from_spec(spec: str, *, upstream_key: str | None = None, tokenizer: Tokenizer | None = None) -> Any:
    """The backend ``spec`` names (see the module docstring); ``ValueError`` if it names none."""
    spec = spec.strip()
    if not spec:
        raise ValueError("the backend spec is empty")
    if Path(spec).suffix.lower() in _ROUTER_SUFFIXES and ":" not in Path(spec).name:
        return _router_from_file(Path(spec), tokenizer)
    return _single(spec, upstream_key, tokenizer)


def _single(spec: str, upstream_key: str | None, tokenizer: Tokenizer | None) -> Any:
    if spec == "echo":
        from .echo import EchoBackend

        return EchoBackend(tokenizer=tokenizer)
    if spec.startswith(_UPSTREAM_SCHEMES):
        from .openai_compatible import OpenAICompatibleBackend

        return OpenAICompatibleBackend(spec.removeprefix("openai+"), api_key=upstream_key or None)
    if spec.startswith(("http://", "https://")):
        raise ValueError(f"{spec!r}: write an OpenAI-compatible server as openai+{spec}")
    if "://" in spec:
        raise ValueError(f"unknown backend {spec!r}: an OpenAI-compatible server is openai+http:// or openai+https://")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"unknown backend {spec!r}: expected echo, openai+http(s)://host/v1, package.module:attribute or a router "
            "file (.toml, .json)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"backend {spec!r}: cannot import {module_name!r} ({exc})") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"backend {spec!r}: {module_name!r} has no attribute {attribute!r}") from None
    if isinstance(target, type) or (callable(target) and not hasattr(target, "list_models")):
        target = target()  # a class or factory: called once, with no arguments
    return target


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"router file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"router file {str(path)!r} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"router file {str(path)!r} must hold a table/object at the top")
    return data


def _router_from_file(path: Path, tokenizer: Tokenizer | None) -> Any:
    from .router import RouterBackend

    config = _load(path)
    named = config.get("backends")
    if not isinstance(named, Mapping) or not named:
        raise ValueError(f"router file {str(path)!r} needs a [backends] table naming at least one backend")
    backends: dict[str, Any] = {}
    for name, entry in named.items():
        where = f"router file {str(path)!r}, backends.{name}"
        if isinstance(entry, str):
            spec, key = entry, None
        elif isinstance(entry, Mapping) and isinstance(entry.get("spec"), str):
            spec = entry["spec"]
            unknown = set(entry) - {"spec", "key", "key_env"}
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            key = entry.get("key")
            if "key_env" in entry:
                key = os.environ.get(str(entry["key_env"]))
                if key is None:
                    raise ValueError(f"{where}: the environment variable {entry['key_env']!r} is not set")
        else:
            raise ValueError(f"{where}: expected a spec string or a table with 'spec'")
        if Path(spec).suffix.lower() in _ROUTER_SUFFIXES:
            raise ValueError(f"{where}: a router's backend cannot be another router file")
        try:
            backends[str(name)] = _single(spec, key, tokenizer)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    try:
        return RouterBackend.from_config(config, backends)
    except ValueError as exc:
        raise ValueError(f"router file {str(path)!r}: {exc}") from None
