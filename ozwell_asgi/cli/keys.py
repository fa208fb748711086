"""``ozwell-asgi keys create|list|revoke|rotate``: manage API keys in the key store ``--store`` names."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Sequence
from typing import Any

from ..auth import ENDPOINTS, KeyHasher, KeyManager, parse_duration
from ..protocols import KeyStore
from ..ratelimit import DEFAULT_PLANS, quota_for
from ..types import DEFAULT_SCOPES, APIKey
from .errors import CLIError, usage_error
from .secret import resolve_secret
from .settings import ServeConfig, add_flag, resolve_one, row
from .stores import open_store, run_with_store

__all__ = ["add_keys_command"]

STORE = row(ServeConfig, "store_url")
SECRET_FILE = row(ServeConfig, "secret_file")


# -------------------------------------------------------------------------------------------------- formatting


def _when(epoch: int | None) -> str:
    if epoch is None:
        return "never"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _limits(key: APIKey) -> tuple[int | None, int | None]:
    try:
        quota = quota_for(key.plan, key.rpm, key.tpm, DEFAULT_PLANS)
    except ValueError:  # a plan this CLI does not know (a host's own plans): show the key's own limits
        return key.rpm, key.tpm
    return quota.rpm, quota.tpm


def _key_record(key: APIKey, now: float) -> dict[str, Any]:
    """What ``keys list`` shows of a key: never its secret or hash. ``rpm``/``tpm`` are the effective limits."""
    rpm, tpm = _limits(key)
    return {
        "id": key.id,
        "name": key.name,
        "owner": key.owner,
        "plan": key.plan,
        "rpm": rpm,
        "tpm": tpm,
        "models": None if key.models is None else list(key.models),
        "scopes": list(key.scopes),
        "origins": None if key.origins is None else list(key.origins),
        "endpoints": None if key.endpoints is None else list(key.endpoints),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "status": key.status(now),
        "hint": key.hint,
    }


def _limit_text(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _summary(key: APIKey) -> list[str]:
    rpm, tpm = _limits(key)
    return [
        f"  id:      {key.id}",
        f"  name:    {key.name}",
        f"  owner:   {key.owner}",
        f"  plan:    {key.plan}",
        f"  limits:  {_limit_text(rpm)} requests/min, {_limit_text(tpm)} tokens/min",
        f"  models:  {'all' if key.models is None else ', '.join(key.models) or 'none'}",
        f"  scopes:  {', '.join(key.scopes)}",
        *([f"  origins: {', '.join(key.origins)}"] if key.origins is not None else []),
        *([f"  endpoints: {', '.join(key.endpoints)}"] if key.endpoints is not None else []),
        f"  expires: {_when(key.expires_at)}",
    ]


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# ------------------------------------------------------------------------------------------------------- keys


def _csv(text: str | None, flag: str) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise usage_error(f"{flag} needs at least one comma-separated value")
    return items


def _store_url(args: argparse.Namespace) -> str:
    url: str = resolve_one(STORE, args.store_url)
    return url


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key; print a summary, then the secret alone on the last line (it is shown only this once)."""
    models = _csv(args.models, "--models")
    scopes = _csv(args.scopes, "--scopes") or list(DEFAULT_SCOPES)
    expires_in = None
    if args.expires_in is not None:
        try:
            expires_in = parse_duration(args.expires_in)
        except ValueError as exc:
            raise usage_error(f"--expires-in: {exc}") from exc
    options: dict[str, Any] = {
        "name": args.name,
        "owner": args.owner,
        "plan": args.plan,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "models": models,
        "scopes": scopes,
        "expires_in": expires_in,
        "origins": _csv(args.origins, "--origins"),
        "endpoints": _csv(args.endpoints, "--endpoints"),
    }
    url = _store_url(args)
    open_store(url)
    # Validate everything (KeyManager's own rules, on a throwaway store) before a secret file is created for it.
    run_with_store("memory://", lambda scratch: KeyManager(scratch, KeyHasher(b"x" * 16)).create(**options))
    hasher = KeyHasher(resolve_secret(args.secret_file, create=True))
    key, secret = run_with_store(url, lambda store: KeyManager(store, hasher).create(**options))
    print("\n".join(["Created API key:", *_summary(key), "The secret is shown only once:", secret]))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Print every key (of ``--owner``): a table, or a JSON array with ``--json``. Never a secret or a hash."""

    async def work(store: KeyStore) -> list[APIKey]:
        return await store.list(args.owner)

    keys = run_with_store(_store_url(args), work)
    now = time.time()
    records = [_key_record(key, now) for key in keys]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no API keys" + (f" for owner {args.owner!r}" if args.owner else ""))
        return 0
    header = ["ID", "NAME", "OWNER", "PLAN", "RPM", "TPM", "MODELS", "SCOPES", "CREATED", "EXPIRES", "STATUS", "HINT"]
    rows = [header] + [
        [
            r["id"],
            r["name"],
            r["owner"],
            r["plan"],
            "-" if r["rpm"] is None else str(r["rpm"]),
            "-" if r["tpm"] is None else str(r["tpm"]),
            "*" if r["models"] is None else ",".join(r["models"]),
            ",".join(r["scopes"]),
            _when(r["created_at"]),
            _when(r["expires_at"]),
            r["status"],
            r["hint"] + "...",
        ]
        for r in records
    ]
    print(_table(rows))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key at once (running servers stop accepting it within their key cache TTL). Unknown id: exit 1."""

    async def work(store: KeyStore) -> tuple[APIKey | None, APIKey | None]:
        before = await store.get(args.id)
        if before is None:
            return None, None
        return before, await store.revoke(args.id, int(time.time()))

    before, after = run_with_store(_store_url(args), work)
    if after is None:
        raise CLIError(f"no API key with id {args.id!r}")
    if before is not None and before.revoked_at is not None:
        print(f"API key {after.id} ({after.name}) was already revoked at {_when(after.revoked_at)}")
    else:
        print(f"Revoked API key {after.id} ({after.name}) at {_when(after.revoked_at)}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Give a key a new secret (printed alone on the last line); the old secret stops working. Unknown id: exit 1."""
    url = _store_url(args)
    open_store(url)
    hasher = KeyHasher(resolve_secret(args.secret_file, create=False))

    async def work(store: KeyStore) -> tuple[APIKey | None, tuple[APIKey, str] | None]:
        existing = await store.get(args.id)
        if existing is None or existing.revoked_at is not None:
            return existing, None
        return existing, await KeyManager(store, hasher).rotate(args.id)

    existing, rotated = run_with_store(url, work)
    if existing is None:
        raise CLIError(f"no API key with id {args.id!r}")
    if rotated is None:
        raise CLIError(f"API key {args.id!r} is revoked and cannot be rotated")
    key, secret = rotated
    print(f"Rotated API key {key.id} ({key.name}); the previous secret no longer works.")
    print("The new secret is shown only once:")
    print(secret)
    return 0


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_keys_command(commands: Any) -> None:
    """Add ``keys`` and its actions to ``commands`` (the top-level subparsers)."""
    keys = commands.add_parser("keys", help="create, list, revoke and rotate API keys", description="Manage API keys.")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    actions.required = True

    create = actions.add_parser("create", help="create a key", description=cmd_keys_create.__doc__)
    create.add_argument("--name", required=True, help="a label for the key")
    create.add_argument("--owner", default="default", help="who the key belongs to (default: default)")
    create.add_argument("--plan", default="free", metavar="{" + ",".join(DEFAULT_PLANS) + "}", help="default: free")
    create.add_argument("--rpm", type=_integer, help="requests per minute, overriding the plan's")
    create.add_argument("--tpm", type=_integer, help="tokens per minute, overriding the plan's")
    create.add_argument("--models", metavar="A,B", help="models the key may use (ids or globs; default: all)")
    create.add_argument("--scopes", metavar="S,T", help="scopes: api, admin, admin:global (default: api)")
    create.add_argument("--expires-in", metavar="DURATION", help="lifetime, e.g. 3600, 90m, 12h, 30d, 1w")
    create.add_argument(
        "--origins",
        metavar="O,P",
        help="a scoped key (ozw_scoped_...) usable only from these browser origins, e.g. https://app.example.com, "
        "https://*.example.com",
    )
    create.add_argument(
        "--endpoints",
        metavar="E,F",
        help=f"a scoped key (ozw_scoped_...) limited to these endpoints: {', '.join(ENDPOINTS)}",
    )
    add_flag(create, STORE)
    add_flag(create, SECRET_FILE)
    create.set_defaults(handler=cmd_keys_create)

    listing = actions.add_parser("list", help="list keys", description=cmd_keys_list.__doc__)
    listing.add_argument("--owner", help="only this owner's keys")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    add_flag(listing, STORE)
    listing.set_defaults(handler=cmd_keys_list)

    revoke = actions.add_parser("revoke", help="revoke a key", description=cmd_keys_revoke.__doc__)
    revoke.add_argument("id", metavar="ID", help="the key's id (key_...)")
    add_flag(revoke, STORE)
    revoke.set_defaults(handler=cmd_keys_revoke)

    rotate = actions.add_parser("rotate", help="give a key a new secret", description=cmd_keys_rotate.__doc__)
    rotate.add_argument("id", metavar="ID", help="the key's id (key_...)")
    add_flag(rotate, STORE)
    add_flag(rotate, SECRET_FILE)
    rotate.set_defaults(handler=cmd_keys_rotate)
