"""A function as a model: ``function_backend`` turns ``reply(request)`` into a backend that honours ``n``, ``stop``
and the token bound for it, counts usage, and can answer with tool calls.

Run it:  python examples/function_backend.py        (in-process: no server, no network; prints the answers)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx2
from openai import AsyncOpenAI

from ozwell_asgi import OzwellAPI, ToolCall
from ozwell_asgi.backends.function import Reply, function_backend
from ozwell_asgi.wire.chat import ChatCompletionRequest, message_text

FAQ = {"hours": "We are open 9 to 5, Monday to Friday.", "refund": "Refunds take 5 working days."}


def words(text: str) -> Iterator[str]:
    """Stand-in for a model that produces its answer a piece at a time."""
    first, *rest = text.split(" ")
    yield first
    for word in rest:
        yield " " + word


@function_backend(models=["faq-bot"])
def faq(request: ChatCompletionRequest) -> Iterator[str] | Reply:
    """A plain (blocking) function: it runs in a worker thread, and its pieces stream as they come."""
    question = message_text(request.messages[-1]).lower()
    if request.tools and "order" in question:
        return Reply(tool_calls=[ToolCall(id="", name="look_up_order", arguments='{"order_id": "A-17"}')])
    return words(next((text for topic, text in FAQ.items() if topic in question), "Sorry, I do not know."))


api = OzwellAPI(backend=faq)

ORDER_TOOL = {
    "type": "function",
    "function": {"name": "look_up_order", "parameters": {"type": "object", "properties": {"order_id": {}}}},
}


async def main() -> None:
    _, key = await api.keys.create(name="example", owner="me")
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api, root_path="/v1"))
    client = AsyncOpenAI(api_key=key, base_url="http://ozwell/v1", http_client=http)

    answer = await client.chat.completions.create(
        model="faq-bot", messages=[{"role": "user", "content": "What are your hours?"}]
    )
    print(answer.choices[0].message.content)

    short = await client.chat.completions.create(
        model="faq-bot", messages=[{"role": "user", "content": "What are your hours?"}], max_tokens=3
    )
    print(f"{short.choices[0].message.content} ({short.choices[0].finish_reason})")

    stream = await client.chat.completions.create(
        model="faq-bot", messages=[{"role": "user", "content": "How long does a refund take?"}], stream=True
    )
    print("".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]))

    tools = await client.chat.completions.create(
        model="faq-bot", messages=[{"role": "user", "content": "Where is my order?"}], tools=[ORDER_TOOL]
    )
    call = (tools.choices[0].message.tool_calls or [])[0]
    print(call.function.name, call.function.arguments, tools.choices[0].finish_reason)  # type: ignore[union-attr]
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
