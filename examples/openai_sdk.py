"""The Ozwell docs' first request, with the official OpenAI Python SDK pointed at ozwell-asgi.

ozwell-asgi serve &
export OZWELL_API_KEY=$(ozwell-asgi keys create --name me | tail -1)
python examples/openai_sdk.py
"""

from __future__ import annotations

import asyncio
import os

from openai import AsyncOpenAI, OpenAI

BASE_URL = os.environ.get("OZWELL_BASE_URL", "http://127.0.0.1:8000/v1")
MODEL = os.environ.get("OZWELL_MODEL", "echo")

client = OpenAI(api_key=os.environ["OZWELL_API_KEY"], base_url=BASE_URL)

response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello, Ozwell!"}])
print(response.choices[0].message.content)

stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], stream=True
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()


async def main() -> None:
    async_client = AsyncOpenAI(api_key=os.environ["OZWELL_API_KEY"], base_url=BASE_URL)
    answer = await async_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello from asyncio"}]
    )
    print(answer.choices[0].message.content)
    await async_client.close()


asyncio.run(main())
