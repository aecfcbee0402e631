"""Rerank APIs: Cohere's `/v2/rerank` and `/v1/rerank`, and the providers that copy
it (Jina, Voyage...).

Cohere bills rerank per search unit (a query over up to 100 documents), which its
answer reports in `meta.billed_units.search_units`: that is the event's
`search_queries`. Those that bill rerank per token report `usage.total_tokens`,
recorded as `input_tokens`.
"""

from __future__ import annotations

from typing import Any

from meterline.event import Event
from meterline.gateway.shapes.base import Shape, read_model_and_id
from meterline.lenient import as_dict, as_int


class Rerank(Shape):
    operation = "rerank"
    params = ("top_n", "max_tokens_per_doc", "max_chunks_per_doc", "return_documents")

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        event.streaming = False
        if capture and isinstance(body.get("query"), str):
            event.input_messages = [{"role": "user", "content": body["query"]}]

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if not isinstance(body, dict):
            return
        read_model_and_id(body, event)
        billed = as_dict(as_dict(body.get("meta")).get("billed_units"))
        event.search_queries = as_int(billed.get("search_units"))
        tokens = as_int(as_dict(body.get("usage")).get("total_tokens"))
        if tokens is not None:
            event.input_tokens = tokens


RERANK = Rerank()
