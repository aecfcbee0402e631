"""Exporter `otlp`: events as OTLP traces, logs and metrics, over gRPC or HTTP."""
