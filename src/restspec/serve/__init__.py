"""OpenAI-compatible HTTP server: ``restspec serve``, or :func:`create_app` around any generator."""

from restspec.serve.app import ServerConfig, app_for_engine, create_app

__all__ = ["ServerConfig", "app_for_engine", "create_app"]
