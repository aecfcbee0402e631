"""Billing: the providers' own bills beside the estimates.

`formats.py` reads the providers' exports (OpenAI's and Anthropic's cost APIs, AWS CUR 2.0,
Google Cloud's billing export, Azure's cost export) into `lines.BillingLine`s, `store.py`
keeps them in a ClickHouse table beside the exporter's (`meterline billing import`,
`cli.py`), `pull.py` fetches the OpenAI and Anthropic cost APIs on a schedule, and
`reconcile.py` sets them against the events' estimated cost (`meterline finops reconcile`,
`/api/v1/finops/reconcile`, the `meterline_billing_*` gauges)."""
