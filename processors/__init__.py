"""Processors: synchronous functions on batches of events."""
