"""HTTP: the `http` exporter (`exporter.py`), its options (`config.py`) and the request
bodies it sends, NDJSON, a JSON array or Elasticsearch/OpenSearch `_bulk` lines
(`body.py`)."""
