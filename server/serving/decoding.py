"""Requests that are not valid protobuf get INVALID_ARGUMENT with a plain message.

grpc.aio decodes a request before the service sees it, and a decoding error would reach
the caller as UNKNOWN with a Python class name in its details. The interceptor here wraps
every handler of the server it is installed on (the project's services, health and
reflection alike): their deserializer turns a decoding error into a marker, and the
handler answers a marker with INVALID_ARGUMENT, so a malformed message reads like any
other bad request (drop it, do not retry).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class MalformedRequest:
    """Stands in for a request whose bytes did not decode."""


_MALFORMED = MalformedRequest()


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except DecodeError:
            return _MALFORMED
    return decode


def _message(method: str) -> str:
    return f"the request to {method} is not a valid protobuf message of its type"


def _wrapped(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises on bad bytes."""
    text = _message(method)

    async def reject(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, text)

    async def checked(requests: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if request is _MALFORMED:
                await reject(context)
            yield request

    kwargs = {"request_deserializer": _tolerant(handler.request_deserializer),
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        stream_stream = handler.stream_stream

        async def stream_to_stream(requests: AsyncIterator[Any],
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in stream_stream(checked(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_to_stream, **kwargs)
    if handler.request_streaming:
        stream_unary = handler.stream_unary

        async def stream_to_unary(requests: AsyncIterator[Any],
                                  context: grpc.aio.ServicerContext) -> Any:
            return await stream_unary(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_to_unary, **kwargs)
    if handler.response_streaming:
        unary_stream = handler.unary_stream
        if inspect.iscoroutinefunction(unary_stream):
            # A servicer that answers with context.write (health's Watch) stays one, so
            # grpc drives it as such rather than as a generator.
            async def unary_to_writes(request: Any, context: grpc.aio.ServicerContext) -> None:
                if request is _MALFORMED:
                    await reject(context)
                await unary_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_to_writes, **kwargs)

        async def unary_to_stream(request: Any,
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is _MALFORMED:
                await reject(context)
            async for response in unary_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_to_stream, **kwargs)
    unary_unary = handler.unary_unary

    async def unary_to_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is _MALFORMED:
            await reject(context)
        return await unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_to_unary, **kwargs)


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Answers undecodable requests to any service with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrapped(handler, handler_call_details.method or "")
