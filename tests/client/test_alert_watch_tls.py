"""The alert watcher and the `alerts` command reach a server that requires TLS and a
token, through the same channel factory as the agent's sender."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from reporting import report_run
from tls_certificates import make_certificates, needs_openssl

from raresignal.client.alert_watch import AlertWatcher
from raresignal.client.cli import main
from raresignal.protos.transport import TlsConfig
from raresignal.server.serving.app import ServerConfig, start_in_thread

pytestmark = needs_openssl

TOKEN = "watch-token"


def test_watcher_and_cli_follow_alerts_over_tls(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    make_certificates(tmp_path)
    server_tls = TlsConfig(certificate_chain=str(tmp_path / "server.pem"),
                           private_key=str(tmp_path / "server.key"))
    client_tls = TlsConfig(root_certificates=str(tmp_path / "ca.pem"))
    config = ServerConfig(db_path=str(tmp_path / "rs.db"), host="127.0.0.1", grpc_port=0,
                          metrics_port=0, health_port=0, tokens={TOKEN: ["*"]},
                          tls=server_tls)
    with start_in_thread(config) as server:
        with AlertWatcher(server.grpc_target, token=TOKEN, tls=client_tls) as watcher:
            run_id = report_run(server.grpc_target, "tls-watch",
                                [("nonfinite_values", 1, 1.0)], token=TOKEN, tls=client_tls)
            deadline = time.monotonic() + 10
            while not watcher.fired() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert watcher.error is None
        assert [(a.rule, a.run_id) for a in watcher.fired()] == [("NonFiniteGradients", run_id)]

        assert main(["alerts", "--server", server.grpc_target, "--tls-ca",
                     str(tmp_path / "ca.pem"), "--token", TOKEN]) == 0
        assert "NonFiniteGradients" in capsys.readouterr().out

        plaintext = AlertWatcher(server.grpc_target, token=TOKEN)
        with pytest.raises(grpc.FutureTimeoutError):
            plaintext.start(timeout=2)
        plaintext.stop()
