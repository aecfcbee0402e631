"""meterline: an OpenTelemetry-Collector-style telemetry pipeline for LLM traffic."""

__version__ = "0.1.0"
