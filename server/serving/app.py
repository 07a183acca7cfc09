"""Assembles and runs the server: gRPC services, health port, /metrics, alert clock.

``serve`` runs on the caller's event loop until its stop event is set; ``start_in_thread``
runs it on a thread of its own and returns once every port is listening, which is what
tests, the demo and embedding applications use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter

from raresignal.protos.transport import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    TlsConfig,
    server_options,
)
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from raresignal.server.alerting.alertmanager import AlertmanagerNotifier
from raresignal.server.alerting.engine import AlertEngine
from raresignal.server.alerting.rules import load_rules
from raresignal.server.serving.alertmanager_access import (
    authorization_headers,
    check_url,
    ssl_context,
)
from raresignal.server.serving.auth import AuthInterceptor, TokenStore
from raresignal.server.serving.database_readiness import DatabaseReadiness
from raresignal.server.serving.decoding import DecodingInterceptor
from raresignal.server.serving.health_watch import BoundedHealthServicer
from raresignal.server.serving.ledger import Ledger
from raresignal.server.serving.live import LiveState
from raresignal.server.serving.metrics import RunStateCollector, ServerMetrics
from raresignal.server.serving.metrics_endpoint import (
    MetricsAccessError,
    read_token,
    start_metrics_server,
    tls_context,
)
from raresignal.server.serving.ownership import Ownership, new_replica_id
from raresignal.server.serving.quotas import Quotas
from raresignal.server.serving.service import (
    AlertHub,
    AlertsService,
    Backend,
    IngestService,
    RunsService,
)
from raresignal.server.storage.base import RetentionPolicy, Storage
from raresignal.server.storage.open import open_storage
from raresignal.server.storage.records import AlertChange, AlertRecord

log = logging.getLogger("raresignal.server")

SERVICE_NAMES = (
    ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name,
    alerts_pb2.DESCRIPTOR.services_by_name["Alerts"].full_name,
    alerts_pb2.DESCRIPTOR.services_by_name["Runs"].full_name,
)


@dataclass
class ServerConfig:
    """Every server setting and its one default; the ``server`` command's flags, its
    config file and its environment variables read their defaults from here."""

    db_path: str = "raresignal.db"  # SQLite file or ":memory:", or postgresql://user@host/db
    # Loopback unless told otherwise: listening on every interface is a deliberate choice
    # (the container image and the Helm chart make it).
    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT  # 0: any free port
    metrics_port: int = DEFAULT_METRICS_PORT
    health_port: int = DEFAULT_HEALTH_PORT
    tokens: Mapping[str, Sequence[str]] | None = None  # token -> run-name globs
    rules_path: str | None = None  # None: the default rules shipped with the server
    alertmanager_url: str | None = None
    # Basic auth (username, password read from a file) or a bearer token read from a file;
    # the CA that an https Alertmanager's certificate must chain to (None: the system's).
    alertmanager_username: str | None = None
    alertmanager_password_file: str | None = None
    alertmanager_bearer_token_file: str | None = None
    alertmanager_ca_file: str | None = None
    finished_run_ttl_seconds: float = 3600.0  # how long a finished run stays on /metrics
    clock_interval_seconds: float = 1.0
    # certificate_chain and private_key: the server's pair; root_certificates: the CA that
    # client certificates must chain to (mutual TLS).
    tls: TlsConfig | None = None
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    alertmanager_resend_seconds: float = 60.0
    shutdown_grace_seconds: float = 5.0
    # /metrics: a scrape bearer token read from this file (None: no token), TLS with the
    # certificate above (mutual when the gRPC port is), and series without the run name
    # (run_id alone) for Prometheus servers that teams share.
    metrics_token_file: str | None = None
    metrics_tls: bool = False
    metrics_omit_run_names: bool = False
    # Health.Watch streams served at once; health needs no token, so this bounds what an
    # anonymous caller can hold open.
    max_health_watches: int = 100
    # What each token (with no tokens: all callers together) may make the server keep.
    quotas: Quotas = field(default_factory=Quotas)
    # Replicas on one PostgreSQL database: each run's alerts are evaluated by the replica
    # holding its lease, renewed every heartbeat and taken over by another replica once
    # not renewed for the TTL. A dead replica's alerts flow again within TTL + heartbeat +
    # one clock interval (13 s with these defaults). Unused on SQLite (one process).
    lease_ttl_seconds: float = 10.0
    lease_heartbeat_seconds: float = 2.0
    replica_id: str = ""  # "": host, process id and a random suffix
    # Seconds between two readiness pings of the database: while one fails, the API
    # services report NOT_SERVING on the health port (the process itself stays SERVING).
    database_check_seconds: float = 2.0
    # Seconds between two rounds of storage housekeeping (PostgreSQL: the samples' daily
    # partitions made ahead and those past retention.max_age_days dropped); the first
    # round runs at start. Partitions are made days ahead, so an hour is ample.
    maintenance_interval_seconds: float = 3600.0

    def open_storage(self) -> Storage:
        """The storage backend these settings name (the one place that picks it)."""
        return open_storage(self.db_path, self.retention)

    def open_notifier(self, counter: Counter, generator_url: str) -> AlertmanagerNotifier | None:
        """The Alertmanager notifier these settings name, secrets read from their files;
        None without a URL. AlertmanagerAccessError for settings that cannot be used."""
        if not self.alertmanager_url:
            return None
        check_url(self.alertmanager_url)
        headers = authorization_headers(self.alertmanager_username,
                                        self.alertmanager_password_file,
                                        self.alertmanager_bearer_token_file)
        context = ssl_context(self.alertmanager_url, self.alertmanager_ca_file)
        return AlertmanagerNotifier(self.alertmanager_url, counter, generator_url,
                                    headers=headers, ssl_context=context)

    def metrics_access(self) -> tuple[str | None, ssl.SSLContext | None]:
        """The /metrics scrape token and TLS context these settings name, read from their
        files; MetricsAccessError for settings that cannot be used."""
        token = read_token(self.metrics_token_file) if self.metrics_token_file else None
        if not self.metrics_tls:
            return token, None
        if self.tls is None:
            raise MetricsAccessError("TLS on the metrics port reuses the server's "
                                     "certificate: set --tls-cert and --tls-key too")
        return token, tls_context(self.tls)


@dataclass(frozen=True)
class Endpoints:
    grpc_target: str
    metrics_url: str
    health_target: str

    def to_json(self) -> str:
        return json.dumps({"grpc": self.grpc_target, "metrics": self.metrics_url,
                           "health": self.health_target})


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("localhost" if host == "::" else host)


async def serve(config: ServerConfig, *, stop: asyncio.Event | None = None,
                ready: Callable[[Endpoints], None] | None = None) -> None:
    """Runs the server until ``stop`` is set (or the task is cancelled), then shuts down
    gracefully: stops accepting calls, lets in-flight ones finish, flushes storage and
    pending Alertmanager notifications."""
    stop = stop or asyncio.Event()
    rules = load_rules(config.rules_path)
    metrics_token, metrics_tls = config.metrics_access()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as resources:
        # Resources are released in reverse order of creation, whatever fails.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raresignal-storage")
        resources.callback(executor.shutdown, wait=True)
        live = LiveState()

        ownership = Ownership(config.replica_id or new_replica_id(), config.lease_ttl_seconds,
                              config.lease_heartbeat_seconds)

        def open_ledger() -> Ledger:
            return Ledger(config.open_storage(), AlertEngine(rules), live, quotas=config.quotas,
                          finished_run_ttl_seconds=config.finished_run_ttl_seconds,
                          ownership=ownership)

        ledger = await loop.run_in_executor(executor, open_ledger)

        async def close_ledger() -> None:
            await loop.run_in_executor(executor, ledger.close)

        resources.push_async_callback(close_ledger)
        registry = CollectorRegistry()
        metrics = ServerMetrics(registry)
        registry.register(RunStateCollector(
            live, config.finished_run_ttl_seconds,
            include_run_names=not config.metrics_omit_run_names))
        http_server, http_thread = start_metrics_server(
            config.host, config.metrics_port, registry, token=metrics_token,
            context=metrics_tls)
        resources.callback(http_thread.join, 5)
        resources.callback(http_server.server_close)
        resources.callback(http_server.shutdown)
        host = _display_host(config.host)
        scheme = "https" if metrics_tls is not None else "http"
        metrics_url = f"{scheme}://{host}:{http_server.server_port}/metrics"
        notifier = config.open_notifier(metrics.notifications, metrics_url)
        if notifier is not None:
            resources.callback(notifier.close)
        tokens = TokenStore(config.tokens)
        hub = AlertHub()
        backend = Backend(ledger, executor, metrics, tokens, hub, notifier)

        health_servicer = BoundedHealthServicer(config.max_health_watches)
        server = grpc.aio.server(options=server_options(),
                                 interceptors=[AuthInterceptor(tokens), DecodingInterceptor()])
        ingest_pb2_grpc.add_IngestServicer_to_server(IngestService(backend), server)
        alerts_pb2_grpc.add_AlertsServicer_to_server(AlertsService(backend), server)
        alerts_pb2_grpc.add_RunsServicer_to_server(RunsService(backend), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.grpc_port}"
        if config.tls is not None:
            grpc_port = server.add_secure_port(address, config.tls.server_credentials())
        else:
            grpc_port = server.add_insecure_port(address)
        health_server = grpc.aio.server(interceptors=[DecodingInterceptor()])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(f"{config.host}:{config.health_port}")

        await health_server.start()
        resources.push_async_callback(health_server.stop, 0)
        await server.start()
        resources.push_async_callback(server.stop, config.shutdown_grace_seconds)
        resources.callback(hub.close)
        resources.push_async_callback(health_servicer.enter_graceful_shutdown)
        resources.callback(log.info, "raresignal server stopping")
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        endpoints = Endpoints(f"{host}:{grpc_port}", metrics_url, f"{host}:{health_port}")
        log.info("raresignal server listening: grpc=%s%s metrics=%s health=%s db=%s "
                 "rules=%d alertmanager=%s auth=%s metrics-auth=%s", endpoints.grpc_target,
                 " (tls)" if config.tls else "", metrics_url, endpoints.health_target,
                 config.db_path, len(rules), config.alertmanager_url or "off",
                 "open" if tokens.is_open else "tokens",
                 "token" if metrics_token else "open")
        readiness = DatabaseReadiness(ledger.storage.ping, health_servicer, SERVICE_NAMES,
                                      config.database_check_seconds)
        for task in (asyncio.create_task(_run_clock(backend, config)),
                     asyncio.create_task(_run_maintenance(backend, config)),
                     asyncio.create_task(readiness.run())):
            resources.push_async_callback(_cancel, task)
        if ready is not None:
            ready(endpoints)
        await stop.wait()
    log.info("raresignal server stopped")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _run_clock(backend: Backend, config: ServerConfig) -> None:
    """Evaluates the clock rules and re-posts firing alerts to Alertmanager (and, on a
    replica, the alerts of the runs it took over)."""
    ledger = backend.ledger
    last_resend = time.monotonic()

    def tick() -> tuple[list[AlertChange], list[AlertRecord]]:
        return ledger.tick(), ledger.take_redeliveries()

    while True:
        await asyncio.sleep(config.clock_interval_seconds)
        try:
            changes, redeliveries = await backend.call(tick)
            backend.publish(changes)
            if backend.notifier is not None and redeliveries:
                backend.notifier.notify(redeliveries)
            if (backend.notifier is not None
                    and time.monotonic() - last_resend >= config.alertmanager_resend_seconds):
                last_resend = time.monotonic()
                backend.notifier.notify(await backend.call(backend.ledger.active_alerts))
        except Exception:
            log.exception("alert clock failed; trying again next tick")


async def _run_maintenance(backend: Backend, config: ServerConfig) -> None:
    """Runs the storage's housekeeping now and then every maintenance interval."""
    while True:
        try:
            done = await backend.call(backend.ledger.storage.maintain, time.time())
            if done is not None:
                log.info("storage maintenance: %s", done)
        except Exception:
            log.exception("storage maintenance failed; trying again next round")
        await asyncio.sleep(config.maintenance_interval_seconds)


class ServerHandle:
    """A server running on its own thread. ``stop()`` shuts it down gracefully."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._endpoints: Endpoints | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="raresignal-server",
                                        daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.config, stop=self._stop, ready=self._on_ready)

        try:
            asyncio.run(run())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def _on_ready(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints
        self._ready.set()

    def start(self, timeout_seconds: float = 30.0) -> ServerHandle:
        self._thread.start()
        if not self._ready.wait(timeout_seconds):
            raise TimeoutError(f"server did not start within {timeout_seconds} s")
        if self._endpoints is None:
            if self._error is not None:
                raise self._error
            raise RuntimeError("server stopped before it was listening")
        return self

    @property
    def endpoints(self) -> Endpoints:
        assert self._endpoints is not None
        return self._endpoints

    @property
    def grpc_target(self) -> str:
        return self.endpoints.grpc_target

    @property
    def metrics_url(self) -> str:
        return self.endpoints.metrics_url

    @property
    def health_target(self) -> str:
        return self.endpoints.health_target

    def stop(self, timeout_seconds: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_seconds)
        if self._thread.is_alive():
            raise TimeoutError(f"server did not stop within {timeout_seconds} s")

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_in_thread(config: ServerConfig, timeout_seconds: float = 30.0) -> ServerHandle:
    """Starts a server on a background thread; returns once it is listening."""
    return ServerHandle(config).start(timeout_seconds)
