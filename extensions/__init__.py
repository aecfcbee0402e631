"""Extensions: components beside the pipelines (APIs, background tasks), in no pipeline."""
