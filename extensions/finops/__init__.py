"""FinOps: the `finops` extension (`extension.py`, its options in `config.py`): the analytics
API (`api.py` over `analytics.py` and the reports of `finops.py`), budgets (`budgets.py`) and
the `meterline finops` command (`cli.py`), all reading the tables a `clickhouse` exporter
writes (through `meterline.exporters.clickhouse.query`); that exporter imports nothing of it."""
