"""Serving: router, prefill and decode workers, OpenAI-compatible API."""
