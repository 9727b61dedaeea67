"""Prometheus exporter for Ollama."""

__version__ = "0.1.0"
