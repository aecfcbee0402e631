"""Receivers: components that take events from the outside into the pipeline."""
