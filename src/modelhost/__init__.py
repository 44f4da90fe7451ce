"""modelhost: a self-hosted inference gateway with one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
