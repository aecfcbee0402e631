"""Kafka: the `kafka` receiver (`receiver.py`) and how it decodes messages
(`messages.py`). Its connection settings are shared with the exporter
(`clients/kafka.py`)."""
