"""Exporter `prometheus`: LLM-call metrics (the seeds' `llm_gateway_*` names) to scrape."""
