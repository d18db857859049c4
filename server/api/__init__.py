"""OpenAI-compatible HTTP API over the AsyncEngine (FastAPI)."""
