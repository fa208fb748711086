"""A conversation over the Responses API with the official OpenAI Python SDK: each turn is chained to the one before
by ``previous_response_id``, so the server sends the model the whole conversation and the client sends only the new
message. Then the same with Ozwell's ``conversation_id``, and the answer streamed.

ozwell-asgi serve &
export OZWELL_API_KEY=$(ozwell-asgi keys create --name me | tail -1)
python examples/responses_chat.py
"""

from __future__ import annotations

import os

from openai import OpenAI

BASE_URL = os.environ.get("OZWELL_BASE_URL", "http://127.0.0.1:8000/v1")
MODEL = os.environ.get("OZWELL_MODEL", "echo")

client = OpenAI(api_key=os.environ["OZWELL_API_KEY"], base_url=BASE_URL)

# Chained by id: the server keeps the conversation.
previous_id = None
for question in ("My name is Ada.", "What is my name?"):
    response = client.responses.create(
        model=MODEL, input=question, instructions="Answer briefly.", previous_response_id=previous_id
    )
    print(response.output_text)
    previous_id = response.id

# The whole conversation the model saw for the last turn is on the server: list this turn's input.
print([item.content[0].text for item in client.responses.input_items.list(previous_id)])  # type: ignore[union-attr]

# Chained by conversation id (Ozwell's extension): each turn follows the latest one of that conversation.
for question in ("First question", "Second question"):
    with client.responses.stream(model=MODEL, input=question, extra_body={"conversation_id": "example-1"}) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
    print()

client.responses.delete(previous_id)
client.close()
