"""What a server answers the daemon, read within a bound.

Exporters and extensions call servers the daemon does not run: an OTLP collector, an HTTP
endpoint, a budget's webhook, a provider's cost API. `response.read()` would keep
whatever such a server sends (aiohttp decodes a gzip body as it reads it, so a few
kilobytes on the wire may be gigabytes), in the process that holds every queue. So an
answer is read up to a bound, and what lies past it is never read.
"""

from __future__ import annotations

import aiohttp

_CHUNK = 64 << 10
REASON_BYTES = 64 << 10  # of an answer that is only an error's reason


class AnswerTooLarge(Exception):
    """A body past the bound its reader set."""


async def read_answer(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of `response`; `AnswerTooLarge` once it passes `limit` bytes."""
    return await _read(response, limit, cut=False)


async def answer_start(response: aiohttp.ClientResponse, limit: int = REASON_BYTES) -> bytes:
    """The first `limit` bytes of the body of `response` (all of a shorter one): what an
    error's reason needs."""
    return await _read(response, limit, cut=True)


async def _read(response: aiohttp.ClientResponse, limit: int, cut: bool) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if not cut:
                raise AnswerTooLarge(f"{response.url.host}: the answer passed {limit:,} "
                                     "bytes; the rest was not read")
            break
    return b"".join(chunks)[:limit]
