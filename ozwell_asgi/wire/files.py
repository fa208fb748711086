"""The wire form of ``/v1/files``: the multipart fields of an upload, the list query, and the bodies we answer.

Bodies follow OpenAI's ``OpenAIFile``, ``ListFilesResponse`` and ``DeleteFileResponse``. Two decisions where the
published schema and the API differ: ``purpose`` may be ``evals`` (``CreateFileRequest`` accepts it, the
``OpenAIFile`` enum has not caught up) and is answered as given; an empty list has ``first_id``/``last_id`` null.
``expires_at`` is left out of a file that never expires (the schema's field is a non-null integer), and ``status``,
deprecated but required, is always ``"processed"``.

Form fields and query parameters arrive as text: an integer is read from its digits here, then the models
validate strictly, so errors name the field as OpenAI does (``purpose``, ``expires_after.seconds``, ``limit``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidRequestError
from ..types import PageQuery, StoredFile
from ._errors import CODE_MISSING, ClosedModel, invalid_request

__all__ = [
    "MAX_FILENAME_BYTES",
    "PURPOSES",
    "CreateFileForm",
    "content_disposition",
    "deleted_file",
    "file_object",
    "media_type",
    "parse_create_form",
    "parse_list_query",
    "sanitize_filename",
]

Purpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
PURPOSES: tuple[str, ...] = get_args(Purpose)
MIN_EXPIRY_SECONDS = 3600  # OpenAI's bounds on expires_after.seconds: one hour to thirty days
MAX_EXPIRY_SECONDS = 2_592_000
MAX_LIST_LIMIT = 100
MAX_CURSOR_LENGTH = 256  # longer than any id we make; longer cursors are refused rather than looked up
MAX_FILENAME_BYTES = 255  # UTF-8 bytes, as most file systems allow
DEFAULT_FILENAME = "upload"
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_NESTED = re.compile(r"([A-Za-z_]+)\[([A-Za-z_]+)\]")  # expires_after[seconds]
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
# Unicode bidirectional controls: they make "exe.txt" display as something else.
_DROPPED = frozenset(("Cc", "Zl", "Zp"))  # control characters, line and paragraph separators
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _integer(value: object) -> object:
    """A form or query value as an int when it is one written in digits; anything else as it came."""
    return int(value) if isinstance(value, str) and _INTEGER.fullmatch(value) else value


def _raise(exc: ValidationError, root: object) -> InvalidRequestError:
    wire = invalid_request(exc, root)
    return InvalidRequestError(wire.message, param=wire.param, code=wire.code)


# --- POST /files ---------------------------------------------------------------------------------------------


class FileExpiration(ClosedModel):
    """OpenAI's ``FileExpirationAfter``: the file is deleted ``seconds`` after it was created."""

    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=MIN_EXPIRY_SECONDS, le=MAX_EXPIRY_SECONDS)]


class CreateFileForm(ClosedModel):
    """The fields of ``CreateFileRequest`` beside ``file``: closed (an unknown field is a 400 naming it)."""

    purpose: Purpose | None = None
    expires_after: FileExpiration | None = None

    def expires_at(self, created_at: int) -> int | None:
        return None if self.expires_after is None else created_at + self.expires_after.seconds


def parse_create_form(fields: Mapping[str, str], *, final: bool) -> CreateFileForm:
    """Validate an upload's text fields; 400 with ``param`` for the first bad one.

    ``final=False`` checks what has arrived so far (before the file part): every name must be known and a complete
    value valid, but ``purpose`` may still come, and so may the rest of ``expires_after``. ``final=True`` is the
    whole form: ``purpose`` is required.
    """
    root: dict[str, Any] = {}
    for name, value in fields.items():
        nested = _NESTED.fullmatch(name)
        if nested is None:
            root[name] = value
        else:
            group = root.setdefault(nested.group(1), {})
            if isinstance(group, dict):  # else the group was also sent whole: validation reports its type
                group[nested.group(2)] = _integer(value)
    if not final:
        group = root.get("expires_after")
        if isinstance(group, dict) and not {"anchor", "seconds"} <= group.keys():
            del root["expires_after"]  # its other half may follow the file
    try:
        form = CreateFileForm.model_validate(root, strict=True)
    except ValidationError as exc:
        raise _raise(exc, root) from None
    if final and form.purpose is None:
        raise InvalidRequestError("Missing required parameter: 'purpose'.", param="purpose", code=CODE_MISSING)
    return form


def sanitize_filename(raw: str | None) -> str:
    """The name a file is stored under: the last path component of what the client sent, without control,
    line-breaking or bidirectional characters, surrounding spaces or dots-only names, at most
    :data:`MAX_FILENAME_BYTES` UTF-8 bytes (the extension kept when it is short); ``"upload"`` when nothing is left.
    """
    if not raw:
        return DEFAULT_FILENAME
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c not in _BIDI and unicodedata.category(c) not in _DROPPED).strip()
    if not name.strip("."):
        return DEFAULT_FILENAME
    encoded = name.encode()
    if len(encoded) > MAX_FILENAME_BYTES:
        stem, dot, extension = name.rpartition(".")
        tail = (dot + extension).encode() if stem and len(extension.encode()) <= 16 else b""
        head = encoded[: MAX_FILENAME_BYTES - len(tail)].decode("utf-8", "ignore")
        name = head + tail.decode()
    return name


def media_type(raw: str | None) -> str:
    """The part's ``Content-Type`` as a bare ``type/subtype`` (lower case, no parameters); anything not of that
    shape becomes ``application/octet-stream``. It is sent back as the download's ``Content-Type``."""
    if raw:
        candidate = raw.partition(";")[0].strip().lower()
        if _MEDIA_TYPE.fullmatch(candidate):
            return candidate
    return "application/octet-stream"


# --- GET /files ----------------------------------------------------------------------------------------------


class ListFilesQuery(BaseModel):
    """The query of ``GET /files``. Parameters we do not know are ignored, as query strings go."""

    model_config = ConfigDict(extra="ignore")

    purpose: Annotated[str, Field(max_length=64)] | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT)] = 20
    after: Annotated[str, Field(max_length=MAX_CURSOR_LENGTH)] | None = None
    before: Annotated[str, Field(max_length=MAX_CURSOR_LENGTH)] | None = None
    order: Literal["asc", "desc"] = "desc"


def parse_list_query(params: Mapping[str, str]) -> tuple[PageQuery, str | None]:
    """The page asked for and the ``purpose`` filter; 400 with ``param`` for a bad value, or for ``after`` and
    ``before`` together."""
    root: dict[str, object] = {k: params[k] for k in ListFilesQuery.model_fields if k in params}
    if "limit" in root:
        root["limit"] = _integer(root["limit"])
    try:
        query = ListFilesQuery.model_validate(root, strict=True)
    except ValidationError as exc:
        raise _raise(exc, root) from None
    if query.after is not None and query.before is not None:
        raise InvalidRequestError("Give at most one of 'after' and 'before'.", param="before", code="invalid_value")
    page = PageQuery(limit=query.limit, after=query.after, before=query.before, order=query.order)
    return page, query.purpose


# --- answers -------------------------------------------------------------------------------------------------


def file_object(file: StoredFile) -> dict[str, Any]:
    """OpenAI's ``OpenAIFile``."""
    body: dict[str, Any] = {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
    }
    if file.expires_at is not None:
        body["expires_at"] = file.expires_at
    return body


def deleted_file(file_id: str) -> dict[str, Any]:
    """OpenAI's ``DeleteFileResponse``."""
    return {"id": file_id, "object": "file", "deleted": True}


def content_disposition(filename: str) -> bytes:
    """``attachment`` with the name twice (RFC 6266): an ASCII ``filename`` for old clients, the exact UTF-8 name
    as ``filename*``."""
    fallback = "".join(c if " " <= c < "\x7f" and c not in '"\\%' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}".encode("ascii")
