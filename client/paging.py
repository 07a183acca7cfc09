"""Reading a paged list to its end (or to a total), one request per page."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2

T = TypeVar("T")

# fetch(page_token, page_size) -> (the page's items, next_page_token)
PageFetch = Callable[[str, int], tuple[Sequence[T], str]]


def follow_pages(fetch: PageFetch[T], limit: int = 0) -> Iterator[T]:
    """Every item of every page, in order, at most ``limit`` of them (0: no bound).

    Each request asks for the items still wanted (0: the server's default page size), so
    a small ``limit`` costs one small page; a page that comes back smaller (the server's
    maximum, or its byte bound) is simply followed by the next."""
    token = ""
    remaining = limit
    while True:
        items, token = fetch(token, remaining if limit else 0)
        for item in items:
            yield item
            if limit:
                remaining -= 1
                if remaining == 0:
                    return
        if not token:
            return


def read_series(stub: alerts_pb2_grpc.RunsStub, request: alerts_pb2.GetSeriesRequest,
                metadata: Sequence[tuple[str, str]] = (), timeout: float = 10.0,
                limit: int = 0) -> list[common_pb2.Sample]:
    """Every stored sample of one series from ``request.since_step`` on (at most
    ``limit``; 0: all), oldest first, however many pages it takes."""

    def fetch(token: str, page_size: int) -> tuple[Sequence[common_pb2.Sample], str]:
        page = alerts_pb2.GetSeriesRequest()
        page.CopyFrom(request)
        page.page_token, page.page_size = token, page_size
        response = stub.GetSeries(page, metadata=metadata, timeout=timeout)
        return response.samples, response.next_page_token

    return list(follow_pages(fetch, limit))
