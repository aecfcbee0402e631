"""Exporters: components that deliver batches out of the pipeline."""
