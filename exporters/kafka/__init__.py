"""Kafka: the `kafka` exporter (`exporter.py`), how events become messages
(`messages.py`), and the connection settings it shares with the `kafka` receiver
(`connection.py`)."""
