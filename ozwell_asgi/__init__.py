"""ozwell_asgi: serve the Ozwell (OpenAI-compatible) /v1 API from any ASGI application."""
