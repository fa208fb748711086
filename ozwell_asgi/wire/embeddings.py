"""The wire form of ``POST /v1/embeddings``: OpenAI's ``CreateEmbeddingRequest``.

The spec closes this object (``additionalProperties: false``), so unknown fields are a 400 here, unlike the chat
request. Shape limits that need no tokenizer are checked by the model (at most 2,048 inputs, no empty string, no
empty token list); the token limits (8,192 per input, 300,000 per request) are the route's, which counts.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import Field

from ._errors import ClosedModel, parse_json_body

__all__ = ["MAX_INPUTS", "EmbeddingInput", "EmbeddingRequest", "parse_embedding_request"]

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request

NonEmptyText = Annotated[str, Field(min_length=1)]
TokenList = Annotated[list[int], Field(min_length=1)]
EmbeddingInput: TypeAlias = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_INPUTS)]
    | Annotated[list[int], Field(min_length=1, max_length=MAX_INPUTS)]
    | Annotated[list[TokenList], Field(min_length=1, max_length=MAX_INPUTS)]
)


class EmbeddingRequest(ClosedModel):
    """OpenAI's ``CreateEmbeddingRequest``: ``input`` is a string, a list of strings, a token list or a list of token
    lists."""

    input: EmbeddingInput
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list, one per vector: a lone string or a lone token list is one input."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if isinstance(value[0], int):
            return [value]
        items: list[str | list[int]] = [*value]
        return items


def parse_embedding_request(body: bytes | str) -> EmbeddingRequest:
    """Validate a JSON body; :class:`~ozwell_asgi.errors.InvalidRequestError` (400 with ``param``) if it does not."""
    return parse_json_body(EmbeddingRequest, body)
