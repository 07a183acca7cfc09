"""End to end with real training: a Lightning run whose rare rule is made to collapse
reports through the real agent to a raresignal server, which a real Prometheus scrapes
every second with the chart's rules loaded. Prometheus must see the server's collapse
alert firing, and every dashboard query must return data for the run.

The training is the demo's (a small transformer, a 3% rare compositional rule, the rare
slice dropped and weight decay raised at step 250), with the monitor at its defaults."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from deploy_support import PrometheusServer, dashboard_queries
from test_deploy_prometheus_e2e import _poll, scraping_prometheus

from raresignal.demo.app import RARE_PROBE, DemoSettings, probes
from raresignal.demo.task import TaskConfig
from raresignal.demo.training import CollapseInducer, DemoModule, TokenStream
from raresignal.integrations.lightning import RaresignalCallback
from raresignal.server.serving.app import ServerConfig, start_in_thread

RUN = "deploy-e2e-training"


@pytest.mark.slow
def test_real_training_collapse_reaches_prometheus_and_the_dashboard(
        start_prometheus: Callable[[dict[str, Any]], PrometheusServer],
        tmp_path: Path) -> None:
    settings = DemoSettings.quick()
    torch.manual_seed(settings.seed)
    torch.set_num_threads(1)
    task = TaskConfig(seed=settings.seed)
    rare, common = probes(task)
    stream = TokenStream(task)

    config = ServerConfig(db_path=str(tmp_path / "raresignal.db"), host="127.0.0.1",
                          grpc_port=0, metrics_port=0, health_port=0)
    with start_in_thread(config) as server:
        prometheus = scraping_prometheus(start_prometheus, server.metrics_url, tmp_path)

        callback = RaresignalCallback(server=server.grpc_target, run_name=RUN,
                                      probes={RARE_PROBE: rare}, common_probe=common)
        trainer = pl.Trainer(
            max_steps=settings.steps, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[CollapseInducer(stream, settings.collapse_step), callback])
        trainer.fit(DemoModule(), train_dataloaders=stream.loader())

        # The server's alert on the rare probe, as Prometheus scraped it during the run.
        fired = _poll(prometheus, f'max_over_time(raresignal_alert_firing{{run="{RUN}", '
                                  f'probe="{RARE_PROBE}"}}[15m]) == 1')
        assert fired, "no rare-probe alert reached Prometheus"
        assert {s["metric"]["alert"] for s in fired} <= {
            "RareProbeLossRise", "RareSignalInterference", "RareSignalAbsorbed",
            "RareSignalRetentionLoss"}
        # The chart's mirroring rule turned it into a Prometheus alert.
        mirrored = _poll(prometheus, f'max_over_time(ALERTS{{run="{RUN}", '
                                     'alertstate="firing"}[15m])')
        assert {s["metric"]["alertname"] for s in mirrored} & {
            s["metric"]["alert"] for s in fired}

        # Every dashboard query returned data at some time of a real run. Asked over the
        # run rather than at its end: the overhead budget sets the estimators' cadences
        # from wall time, so on a busy machine a probe alert may already have resolved
        # when training ends, and the firing-alerts table is an instant query.
        empty = [name for name, expr in dashboard_queries().items()
                 if not _poll(prometheus, f"last_over_time(({expr})[15m:1s])")]
        assert empty == []
        # Every step's report arrived: the last one too, flushed when training ended.
        assert _poll(prometheus, f'raresignal_step{{run="{RUN}"}} == {settings.steps - 1}')
