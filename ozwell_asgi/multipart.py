"""Reading a ``multipart/form-data`` body as it arrives, with python-multipart's push parser.

    reader = MultipartReader(request, file_field="file", max_file_size=..., idle_timeout=...)
    part = await reader.next_file()        # the fields before the file are in reader.fields; None: no file part
    async for chunk in reader.file_content():
        ...                                # the file's bytes as they are parsed; then the rest of the body is read
    reader.fields                          # every field, those after the file included

Memory stays bounded whatever the body: the file's bytes are handed on as they arrive (at most one request
message and :data:`CHUNK_BYTES` of them are held), text fields are kept (at most :data:`MAX_FIELDS` of at most
:data:`MAX_FIELD_BYTES` bytes each), part headers are capped by the parser (8 headers of 4 KiB per part), and the
whole body may be at most ``max_file_size`` plus :data:`MAX_FORM_OVERHEAD` bytes. The file passing
``max_file_size``, or the body passing its cap, is a 413 at once (a larger ``Content-Length`` before anything is
read); a body that stops arriving for ``idle_timeout`` seconds is a 408; malformed multipart, a second file, a body
cut short before its closing boundary or a client gone mid-body is a 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .bodies import header
from .errors import InvalidRequestError, PayloadTooLargeError, RequestTimeoutError, UnsupportedMediaTypeError

__all__ = ["CHUNK_BYTES", "MAX_FIELDS", "MAX_FIELD_BYTES", "MAX_FORM_OVERHEAD", "FilePart", "MultipartReader"]

MAX_FIELDS = 16
MAX_FIELD_BYTES = 1024
MAX_FORM_OVERHEAD = 64 * 1024
"""Bytes of a body beyond its file: boundaries, part headers and fields (at most 16 KiB of field values)."""
CHUNK_BYTES = 64 * 1024
"""Pieces of the file smaller than this (a client sending small messages) are gathered up to it before they are
handed on, so a store is never given a flood of tiny chunks; larger ones are handed on as they came."""
_BAD = "Invalid multipart/form-data body"


@dataclass(frozen=True, slots=True)
class FilePart:
    """The file part's headers, as sent (decoded; unsanitised)."""

    name: str
    filename: str | None
    content_type: str | None


class MultipartReader:
    """One request's ``multipart/form-data`` body, read as it arrives (see the module's docstring)."""

    def __init__(self, request: Request, *, file_field: str, max_file_size: int, idle_timeout: float) -> None:
        content_type = header(request, b"content-type")
        media, options = parse_options_header(content_type or "")
        if media != b"multipart/form-data":
            raise UnsupportedMediaTypeError(
                f"Invalid Content-Type header ({(content_type or '')[:100]}): this endpoint expects "
                "'multipart/form-data'."
            )
        boundary = options.get(b"boundary")
        if not boundary or len(boundary) > 70:  # RFC 2046: 1 to 70 characters
            raise InvalidRequestError(f"{_BAD}: the Content-Type header has no valid boundary.")
        self._file_field = file_field
        self._max_file_size = max_file_size
        self._cap = max_file_size + MAX_FORM_OVERHEAD
        declared = header(request, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequestError("Invalid Content-Length header.")
            if int(declared) > self._cap:
                raise self._file_too_large()
        self._receive = request.receive
        self._idle_timeout = idle_timeout
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )
        self.fields: dict[str, str] = {}
        """Text fields by name (the last of a name wins), as they have arrived so far."""
        self.file: FilePart | None = None
        self.file_size = 0
        self._received = 0
        self._body_done = False  # the last request message has arrived
        self._closed = False  # the closing boundary was parsed
        self._in_file = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._field: bytearray | None = None
        self._field_name = ""
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._part_type: bytes | None = None

    def _file_too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"The file is too large: the limit is {self._max_file_size} bytes.", param=self._file_field
        )

    # -- parser callbacks (called from inside ``MultipartParser.write``) ------------------------------------------

    def _on_part_begin(self) -> None:
        self._disposition = b""
        self._part_type = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header_name.lower()
        if name == b"content-disposition":
            self._disposition = self._header_value
        elif name == b"content-type":
            self._part_type = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        kind, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if kind != b"form-data" or raw_name is None:
            raise InvalidRequestError(f"{_BAD}: a part has no 'Content-Disposition: form-data' header with a name.")
        name = raw_name.decode("utf-8", "replace")
        if name == self._file_field:
            if self.file is not None:
                raise InvalidRequestError(
                    f"Only one '{self._file_field}' may be uploaded per request.", param=self._file_field
                )
            raw_filename = options.get(b"filename")
            self.file = FilePart(
                name,
                None if raw_filename is None else raw_filename.decode("utf-8", "replace"),
                None if self._part_type is None else self._part_type.decode("latin-1"),
            )
            self._in_file = True
            return
        if name not in self.fields and len(self.fields) >= MAX_FIELDS:
            raise InvalidRequestError(f"{_BAD}: more than {MAX_FIELDS} fields.")
        self._field = bytearray()
        self._field_name = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_size += end - start
            if self.file_size > self._max_file_size:
                raise self._file_too_large()
            self._pending.append(data[start:end])
            self._pending_size += end - start
            return
        field = self._field
        if field is not None:
            if len(field) + end - start > MAX_FIELD_BYTES:
                shown = self._field_name[:100]
                raise InvalidRequestError(
                    f"Invalid '{shown}': the value is longer than {MAX_FIELD_BYTES} bytes.", param=shown
                )
            field += data[start:end]

    def _on_part_end(self) -> None:
        if self._in_file:
            self._in_file = False
        elif self._field is not None:
            self.fields[self._field_name] = self._field.decode("utf-8", "replace")
            self._field = None

    def _on_end(self) -> None:
        self._closed = True

    # -- reading ----------------------------------------------------------------------------------------------

    async def _feed(self) -> bool:
        """Parse the next request message; False once the whole body has been read."""
        if self._body_done:
            return False
        try:
            async with asyncio.timeout(self._idle_timeout):
                message = await self._receive()
        except TimeoutError:
            raise RequestTimeoutError(
                f"The request body stopped arriving: nothing was received for {self._idle_timeout:g} seconds."
            ) from None
        if message["type"] != "http.request":  # http.disconnect
            raise InvalidRequestError("The client disconnected before sending the whole request body.")
        chunk: bytes = message.get("body", b"")
        if chunk:
            self._received += len(chunk)
            if self._received > self._cap:
                raise self._file_too_large()
            if not self._closed:  # anything after the closing boundary is an epilogue: counted, not parsed
                try:
                    self._parser.write(chunk)
                except FormParserError:
                    raise InvalidRequestError(f"{_BAD}.") from None
            if self._received - self.file_size > MAX_FORM_OVERHEAD:
                raise PayloadTooLargeError(
                    f"The form around the file is too large: the limit is {MAX_FORM_OVERHEAD} bytes besides the file."
                )
        if not message.get("more_body", False):
            self._body_done = True
            if not self._closed:
                raise InvalidRequestError(f"{_BAD}: it ends before its closing boundary.")
        return True

    async def next_file(self) -> FilePart | None:
        """Read up to the file part's headers (its first bytes may have arrived with them); ``None`` if the body
        ended without one."""
        while self.file is None and await self._feed():
            pass
        return self.file

    def _take(self) -> bytes:
        pending = self._pending
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_size = 0
        return chunk

    async def file_content(self) -> AsyncGenerator[bytes, None]:
        """The file's bytes as they are parsed, in pieces of at least :data:`CHUNK_BYTES` but the last; then the
        rest of the body is read, so :attr:`fields` is complete when this ends. Call after :meth:`next_file`."""
        while True:
            if self._pending_size >= CHUNK_BYTES or (self._pending and not self._in_file):
                yield self._take()
            if not await self._feed():
                break
        if self._pending:
            yield self._take()
