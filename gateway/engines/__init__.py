"""Engines the gateway drives: the OpenAI upstream client and the control API client."""
