"""OpenAI-compatible HTTP API over the router (FastAPI), plus the admin hook and the load generator."""

from thunderserve.runtime.api.admin import AdminState
from thunderserve.runtime.api.app import ApiConfig, create_app

__all__ = ["AdminState", "ApiConfig", "create_app"]
