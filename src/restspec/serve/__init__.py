"""OpenAI-compatible HTTP server: ``restspec serve``, or :func:`create_app` around any generator."""

from restspec.serve.app import ServerConfig, app_for_engine, create_app
from restspec.serve.config import AccessConfig, HistoryMode, ServerLimits

__all__ = ["AccessConfig", "HistoryMode", "ServerConfig", "ServerLimits", "app_for_engine", "create_app"]
