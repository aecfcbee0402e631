"""Kafka: the `kafka` exporter (`exporter.py`) and how events become messages
(`messages.py`). Its connection settings are shared with the `kafka` receiver
(`clients/kafka.py`)."""
