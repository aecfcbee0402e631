"""Client settings for an outside system, shared by the components that talk to it.

The core (`meterline/`) knows no system by name, and a receiver does not import an
exporter: when a receiver and an exporter of the same system take the same connection
keys, those keys and what turns them into a client live here, one module per system
(as the OpenTelemetry Collector's `internal/kafka` serves its Kafka receiver and
exporter). Generic client settings (TLS) are the core's: `meterline.tls`.
"""
