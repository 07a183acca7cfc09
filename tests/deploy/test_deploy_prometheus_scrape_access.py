"""A real Prometheus scraping a real server's /metrics over mutual TLS with the scrape
token, as the chart's ServiceMonitor configures it; a wrong token is refused."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from deploy_support import PrometheusServer
from tls_certificates import make_certificates, needs_openssl

from raresignal.client.channels import auth_metadata
from raresignal.protos.transport import TlsConfig, client_channel_options
from raresignal.protos.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from raresignal.server.serving.app import ServerConfig, start_in_thread

SCRAPE_TOKEN = "prometheus-scrape-token-42"
DEADLINE_SECONDS = 60.0


def _report_loss(target: str, certs: Path) -> str:
    credentials = TlsConfig(root_certificates=str(certs / "ca.pem"),
                            certificate_chain=str(certs / "client.pem"),
                            private_key=str(certs / "client.key")).channel_credentials()
    with grpc.secure_channel(target, credentials, client_channel_options()) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        run_id = stub.OpenRun(ingest_pb2.OpenRunRequest(run_name="teamA-private", world_size=1),
                              metadata=auth_metadata(None), timeout=10).run_id
        sample = common_pb2.Sample(metric="loss", step=1, value=0.25, wall_time=time.time())
        list(stub.Report(iter([ingest_pb2.ReportBatch(run_id=run_id, sender_id="rank0",
                                                       sequence=1, samples=[sample])]),
                         timeout=10))
    return run_id


def _target(prometheus: PrometheusServer, job: str) -> dict[str, Any] | None:
    """The job's active target once it has been scraped at least once."""
    for target in prometheus.api("targets")["data"]["activeTargets"]:
        if target["labels"]["job"] == job and target["health"] != "unknown":
            return target
    return None


def _poll(condition: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


@needs_openssl
def test_prometheus_scrapes_with_the_token_over_mutual_tls(
        start_prometheus: Callable[[dict[str, Any]], PrometheusServer],
        tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    token_file = tmp_path / "scrape-token"
    token_file.write_text(SCRAPE_TOKEN)
    wrong_file = tmp_path / "wrong-token"
    wrong_file.write_text("not-the-token")
    tls = TlsConfig(certificate_chain=str(certs / "server.pem"),
                    private_key=str(certs / "server.key"),
                    root_certificates=str(certs / "ca.pem"))
    config = ServerConfig(db_path=str(tmp_path / "raresignal.db"), grpc_port=0,
                          metrics_port=0, health_port=0, tls=tls, metrics_tls=True,
                          metrics_token_file=str(token_file), metrics_omit_run_names=True)
    with start_in_thread(config) as server:
        run_id = _report_loss(server.grpc_target, certs)
        address = server.metrics_url.split("://", 1)[1].split("/", 1)[0]
        tls_config = {"ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "client.pem"),
                      "key_file": str(certs / "client.key")}
        prometheus = start_prometheus({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "scheme": "https", "tls_config": tls_config,
                 "authorization": {"credentials_file": str(credentials)},
                 "static_configs": [{"targets": [address]}]}
                for job, credentials in (("raresignal", token_file), ("intruder", wrong_file))],
        })
        scraped = _poll(lambda: prometheus.query(
            f'raresignal_loss{{job="raresignal", run_id="{run_id}"}}')["data"]["result"])
        assert scraped, "Prometheus did not scrape the run with the token"
        (series,) = scraped
        assert "run" not in series["metric"] and float(series["value"][1]) == 0.25
        refused = _poll(lambda: _target(prometheus, "intruder"))
        assert refused is not None and refused["health"] == "down"
        assert "401" in refused["lastError"], refused["lastError"]
