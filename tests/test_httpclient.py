"""Reading what a server answers within a bound (`meterline.httpclient`): a peer that
answers without end, or with a gzip bomb, costs a bounded read."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from meterline.httpclient import AnswerTooLarge, answer_start, read_answer
from tests.helpers import endless_server, serving


@contextlib.asynccontextmanager
async def answering(response: web.Response) -> AsyncIterator[aiohttp.ClientResponse]:
    """The client's side of a server that answers GET / with `response`."""

    async def answer(_: web.Request) -> web.Response:
        return response

    async with serving(answer) as url, aiohttp.ClientSession() as session, \
            session.get(f"{url}/") as answered:
        yield answered


async def test_an_answer_within_the_bound_is_read_whole():
    async with answering(web.Response(body=b"y" * 100_000)) as response:
        assert await read_answer(response, 100_000) == b"y" * 100_000


async def test_an_endless_answer_is_refused_once_past_the_bound():
    async with endless_server() as base, aiohttp.ClientSession() as session, \
            session.get(base) as response:
        with pytest.raises(AnswerTooLarge, match="passed 1,048,576 bytes"):
            await asyncio.wait_for(read_answer(response, 1 << 20), 10)


async def test_a_gzip_bomb_is_bounded_by_what_it_decodes_to():
    bomb = gzip.compress(b"\0" * (64 << 20), 9)  # 64 MB in about 64 KB
    async with answering(web.Response(body=bomb, headers={"Content-Encoding": "gzip"})
                         ) as response:
        with pytest.raises(AnswerTooLarge):
            await read_answer(response, 1 << 20)


async def test_the_start_of_an_endless_answer_is_its_first_bytes():
    async with endless_server(500) as base, aiohttp.ClientSession() as session, \
            session.get(base) as response:
        start = await asyncio.wait_for(answer_start(response, 1000), 10)
    assert start == b"x" * 1000
