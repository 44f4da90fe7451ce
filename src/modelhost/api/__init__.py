"""HTTP routes: the OpenAI-compatible API and the operational endpoints."""
