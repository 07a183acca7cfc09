"""Reports travel over mutual TLS with certificates made by openssl for the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_toys import LossEstimator
from tls_certificates import make_certificates, needs_openssl

from raresignal.agent import Monitor, MonitorConfig, TlsConfig
from raresignal.client.channels import open_channel
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc
from raresignal.server.serving.app import ServerConfig, start_in_thread

pytestmark = needs_openssl


def test_mutual_tls_delivers_and_a_client_without_certificate_is_refused(
        tmp_path: Path) -> None:
    make_certificates(tmp_path)
    server_tls = TlsConfig(certificate_chain=str(tmp_path / "server.pem"),
                           private_key=str(tmp_path / "server.key"),
                           root_certificates=str(tmp_path / "ca.pem"))
    client_tls = TlsConfig(root_certificates=str(tmp_path / "ca.pem"),
                           certificate_chain=str(tmp_path / "client.pem"),
                           private_key=str(tmp_path / "client.key"))
    with start_in_thread(ServerConfig(db_path=str(tmp_path / "rs.db"), host="127.0.0.1",
                                      grpc_port=0, metrics_port=0, health_port=0,
                                      tls=server_tls)) as server:
        config = MonitorConfig(spool_dir=str(tmp_path / "spool"), tls=client_tls,
                               report_interval_seconds=0.05, max_interval_factor=1)
        monitor = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                          run_name="tls", estimators=[LossEstimator()], config=config)
        for step in range(5):
            monitor.step(loss=torch.tensor(step / 4, dtype=torch.float64))
        assert monitor.close() is True and monitor.run_id is not None

        stranger = Monitor(torch.nn.Linear(2, 2), None, server=server.grpc_target,
                           run_name="tls-stranger", estimators=[LossEstimator()],
                           config=MonitorConfig(
                               spool_dir=str(tmp_path / "spool2"),
                               tls=TlsConfig(root_certificates=str(tmp_path / "ca.pem")),
                               report_interval_seconds=0.05, close_timeout_seconds=1.0))
        stranger.step(loss=torch.tensor(1.0))
        assert stranger.close() is False and stranger.run_id is None

        with open_channel(server.grpc_target, client_tls) as channel:
            response = alerts_pb2_grpc.RunsStub(channel).GetSeries(
                alerts_pb2.GetSeriesRequest(run_id=monitor.run_id, metric="loss"),
                timeout=10)
    assert {s.step: s.value for s in response.samples} == {s: s / 4 for s in range(5)}


def test_half_a_client_key_pair_is_refused() -> None:
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        TlsConfig(certificate_chain="client.pem")
