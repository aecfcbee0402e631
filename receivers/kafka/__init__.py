"""Kafka: the `kafka` receiver (`receiver.py`) and how it decodes messages
(`messages.py`). Its connection settings are the exporter's
(`exporters/kafka/connection.py`)."""
