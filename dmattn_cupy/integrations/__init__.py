"""Integrations with other libraries (``transformers``); each is an optional dependency."""
