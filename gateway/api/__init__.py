"""The OpenAI-compatible client API: request validation, errors, SSE encoding."""
