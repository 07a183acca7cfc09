"""Bearer-token authentication and per-run authorisation.

Tokens map to run-name glob patterns: a token scoped to ``teamA-*`` may open, write and
read runs whose name matches, and gets PERMISSION_DENIED for any other run. A missing or
unknown token gets UNAUTHENTICATED. With no tokens configured the server is open. Health is
open either way; reflection needs a token like every other service.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from raresignal.protos.transport import AUTHORIZATION_METADATA_KEY
from raresignal.server.serving.validation import RequestError

log = logging.getLogger("raresignal.server")

# Kubernetes probes carry no token. Reflection does need one where tokens are configured:
# the service list is of no use to a caller who may not call any of them.
UNAUTHENTICATED_SERVICES = ("/grpc.health.v1.Health/",)


class TokensError(ValueError):
    """A token file or variable that cannot be used."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the run-name patterns their token may touch."""

    patterns: tuple[str, ...]

    def allows(self, run_name: str) -> bool:
        return any(fnmatch.fnmatchcase(run_name, pattern) for pattern in self.patterns)

    def authorize(self, run_name: str) -> None:
        if not self.allows(run_name):
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                               f"this token may not access run {run_name!r}")


EVERYONE = Principal(("*",))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_entry(where: str, token: object, patterns: object) -> tuple[str, list[str]]:
    """One token and its globs, or TokensError naming ``where`` (never the token)."""
    if not isinstance(token, str):
        raise TokensError(f"{where}: the token must be a string (quote it), got "
                          f"{type(token).__name__}")
    if not token:
        raise TokensError(f"{where}: the token is empty")
    if any(character.isspace() or not character.isprintable() for character in token):
        raise TokensError(f"{where}: the token holds whitespace or control characters")
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not patterns:
        raise TokensError(f"{where}: the token needs a list of run-name globs, e.g. "
                          "['teamA-*'] (['*']: every run)")
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern:
            raise TokensError(f"{where}: glob {index} must be a non-empty string, "
                              f"got {pattern!r}")
    return token, patterns


def _add(tokens: dict[str, list[str]], where: str, token: object, patterns: object) -> None:
    token, patterns = _check_entry(where, token, patterns)
    if token in tokens:
        raise TokensError(f"{where}: the token is listed twice")
    tokens[token] = patterns


def _parse_mapping(node: yaml.MappingNode, loader: yaml.SafeLoader,
                   source: str) -> dict[str, list[str]]:
    tokens: dict[str, list[str]] = {}
    for index, (key_node, value_node) in enumerate(node.value, 1):
        where = f"{source}: entry {index} (line {key_node.start_mark.line + 1})"
        try:
            token = loader.construct_object(key_node, deep=True)
            patterns = loader.construct_object(value_node, deep=True)
        except yaml.YAMLError:
            # PyYAML's message quotes the offending text, which may be the token.
            raise TokensError(f"{where}: not plain YAML data") from None
        _add(tokens, where, token, patterns)
    if not tokens:
        raise TokensError(f"{source}: no tokens found")
    return tokens


def parse_tokens(text: str, source: str = "tokens") -> dict[str, list[str]]:
    """Tokens from a YAML/JSON mapping ``{token: [glob, ...]}`` (or ``{token: glob}``), or
    from lines ``token [glob ...]`` (no glob: every run; ``#`` starts a comment).

    Anything else (a YAML list, a token that is not a non-empty string, a token with no
    globs, a token twice) is a TokensError naming the entry's position; no error names
    any part of a token.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError:
            node = None  # not YAML: the lines format
        if isinstance(node, yaml.MappingNode):
            return _parse_mapping(node, loader, source)
        if isinstance(node, yaml.SequenceNode):
            raise TokensError(f"{source}: a YAML list; write a mapping of token: [run-name "
                              "globs]")
    finally:
        loader.dispose()
    tokens: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0].endswith(":"):
            raise TokensError(f"{source}:{number}: write 'token glob ...' or a YAML mapping")
        _add(tokens, f"{source}:{number}", words[0], words[1:] or ["*"])
    if not tokens:
        raise TokensError(f"{source}: no tokens found")
    return tokens


def load_tokens(path: str | Path) -> dict[str, list[str]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TokensError(f"{path}: cannot read tokens file: {exc.strerror}") from None
    return parse_tokens(text, str(path))


def parse_tokens_env(value: str) -> dict[str, list[str]]:
    """RARESIGNAL_TOKENS: the same formats as a file, or ``tok1=glob|glob,tok2``."""
    stripped = value.strip()
    if stripped.startswith(("{", "[")) or "\n" in stripped:
        return parse_tokens(stripped, "RARESIGNAL_TOKENS")  # YAML, which includes JSON
    tokens: dict[str, list[str]] = {}
    for index, entry in enumerate(part.strip() for part in stripped.split(",")):
        if not entry:
            continue
        token, scoped, patterns = entry.partition("=")
        globs = [p for p in patterns.split("|") if p]
        # A bare token may touch every run; "token=" with no glob is a mistake, not that.
        _add(tokens, f"RARESIGNAL_TOKENS: entry {index + 1}", token,
             globs if scoped else ["*"])
    if not tokens:
        raise TokensError("RARESIGNAL_TOKENS holds no tokens")
    return tokens


class TokenStore:
    """Resolves bearer tokens to principals. Tokens are kept only as SHA-256 digests."""

    def __init__(self, tokens: Mapping[str, Sequence[str]] | None) -> None:
        self._by_digest = {_digest(token): Principal(tuple(patterns))
                           for token, patterns in (tokens or {}).items()}
        self.is_open = not self._by_digest
        if self.is_open:
            log.warning("no tokens configured: the server accepts every caller "
                        "(configure --tokens-file or RARESIGNAL_TOKENS)")

    def principal(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The caller's principal; RequestError(UNAUTHENTICATED) when the token is bad."""
        if self.is_open:
            return EVERYONE
        header = ""
        for key, value in metadata or ():
            if key == AUTHORIZATION_METADATA_KEY:
                header = value.decode() if isinstance(value, bytes) else str(value)
                break
        if not header:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED,
                               "missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED,
                               "authorization metadata must be 'Bearer <token>'")
        principal = self._by_digest.get(_digest(token.strip()))
        if principal is None:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return principal


def _denying_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                     message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts the call."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # unreachable: makes this an async generator, as streaming handlers are

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid token before they reach a service. Per-run scoping is
    checked by the services, which know which run a call touches."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if self._tokens.is_open or handler is None or method.startswith(
                UNAUTHENTICATED_SERVICES):
            return handler
        try:
            self._tokens.principal(handler_call_details.invocation_metadata)
        except RequestError as exc:
            return _denying_handler(handler, exc.code, exc.message)
        return handler
