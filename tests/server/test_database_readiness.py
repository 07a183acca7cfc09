"""Readiness follows the database: a real gRPC health server, a database that goes away
and comes back, the statuses a Kubernetes probe would read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from postgres_cluster import Cluster
from server_support import config, wait_for

from raresignal.server.serving.app import start_in_thread
from raresignal.server.serving.database_readiness import DatabaseReadiness
from raresignal.server.serving.health_watch import BoundedHealthServicer

INGEST = "raresignal.v1.Ingest"


class FlakyDatabase:
    def __init__(self) -> None:
        self.up = True
        self.pings = 0

    def ping(self) -> None:
        self.pings += 1
        if not self.up:
            raise ConnectionError("connection refused")


async def _statuses(target: str) -> tuple[int, int]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        ingest = await stub.Check(health_pb2.HealthCheckRequest(service=INGEST))
        return overall.status, ingest.status


def test_ingest_is_not_ready_while_the_database_is_down_and_liveness_stays_up() -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario() -> list[tuple[int, int]]:
        servicer = BoundedHealthServicer(4)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            for name in ("", INGEST):
                await servicer.set(name, serving)
            database = FlakyDatabase()
            readiness = DatabaseReadiness(database.ping, servicer, [INGEST], 60.0)
            target = f"127.0.0.1:{port}"
            seen = []
            assert await readiness.check_once() is True
            seen.append(await _statuses(target))
            database.up = False
            assert await readiness.check_once() is False
            seen.append(await _statuses(target))
            database.up = True
            assert await readiness.check_once() is True
            seen.append(await _statuses(target))
            assert database.pings == 3
            return seen
        finally:
            await server.stop(0)

    assert asyncio.run(scenario()) == [(serving, serving), (serving, not_serving),
                                       (serving, serving)]


def _check(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_a_server_on_postgresql_is_unready_while_its_database_refuses_it(
        postgres_cluster: Cluster, postgres_db: str, password_file: Path,
        tmp_path: Path) -> None:
    import psycopg

    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    settings = config(tmp_path, db_path=postgres_cluster.url(postgres_db),
                      database_check_seconds=0.2)
    admin = postgres_cluster.admin_conninfo()
    with start_in_thread(settings) as server:
        target = server.endpoints.health_target
        assert _check(target, INGEST) == serving
        # The database goes away for this server: no new connections, the pooled ones cut.
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{postgres_db}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s", (postgres_db,))
        try:
            wait_for(lambda: _check(target, INGEST) == not_serving, timeout=60)
            assert _check(target, "") == serving  # alive: liveness must not restart it
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{postgres_db}" ALLOW_CONNECTIONS true')
        wait_for(lambda: _check(target, INGEST) == serving, timeout=90)
