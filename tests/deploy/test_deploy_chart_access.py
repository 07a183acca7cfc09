"""Who can reach what in the chart: the NetworkPolicy, the scrape token and TLS on
/metrics, and the server flags they turn into, rendered by the real Helm SDK."""

from __future__ import annotations

import base64
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    CHART_DIR,
    KUBE_VERSION,
    MONITORING_API,
    by_kind,
    load_values,
    manifests,
    render_chart,
)

from raresignal.server.cli import build_parser, server_settings

MONITORING_TLS = CHART_DIR / "ci" / "monitoring-tls-values.yaml"


def _only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = by_kind(objects, kind)
    return obj


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _ingress_by_port(policy: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    rules = {}
    for rule in policy["spec"]["ingress"]:
        (port,) = rule["ports"]
        rules[port["port"]] = rule["from"]
    return rules


def test_the_default_network_policy_admits_each_port_from_its_own_callers() -> None:
    objects = manifests(render_chart(name="rs", namespace="ml"))
    policy = _only(objects, "NetworkPolicy")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    pod_labels = _only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = _ingress_by_port(policy)
    # Every port the container opens has its rule, named as the container names it.
    assert set(rules) == {port["name"] for port in _container(objects)["ports"]}
    assert rules["grpc"] == [{"podSelector": {"matchLabels": {"raresignal.io/client": "true"}}}]
    assert rules["metrics"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    assert rules["health"] == [{"namespaceSelector": {}}]


def test_a_port_with_no_peers_admits_no_one_and_the_policy_can_be_turned_off() -> None:
    closed = manifests(render_chart({"networkPolicy": {"metricsFrom": []}}))
    assert set(_ingress_by_port(_only(closed, "NetworkPolicy"))) == {"grpc", "health"}
    assert by_kind(manifests(render_chart({"networkPolicy": {"enabled": False}})),
                   "NetworkPolicy") == []


def test_the_readme_training_job_is_admitted_by_the_default_policy() -> None:
    readme = (CHART_DIR.parent / "README.md").read_text()
    block = readme.split("```yaml\n# training-job.yaml\n", 1)[1].split("```", 1)[0]
    (job,) = [doc for doc in yaml.safe_load_all(block) if doc]
    (grpc_peer,) = _ingress_by_port(_only(manifests(render_chart()), "NetworkPolicy"))["grpc"]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    assert grpc_peer["podSelector"]["matchLabels"].items() <= job_labels.items()


def test_the_scrape_token_is_generated_mounted_and_sent_by_the_service_monitor() -> None:
    objects = manifests(render_chart({"serviceMonitor": {"enabled": True}},
                                     api_versions=[MONITORING_API], name="rs", namespace="ml"))
    (secret,) = [s for s in by_kind(objects, "Secret")
                 if s["metadata"]["name"] == "rs-raresignal-metrics-token"]
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 40 and token.isalnum()
    container = _container(objects)
    assert "--metrics-token-file=/etc/raresignal/metrics/token" in container["args"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "metrics-token"]
    assert mount["mountPath"] == "/etc/raresignal/metrics" and mount["readOnly"]
    volumes = {v["name"]: v for v in _only(objects, "Deployment")["spec"]["template"]["spec"][
        "volumes"]}
    assert volumes["metrics-token"]["secret"] == {
        "secretName": "rs-raresignal-metrics-token", "items": [{"key": "token",
                                                                "path": "token"}]}
    (endpoint,) = _only(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "http" and "tlsConfig" not in endpoint
    assert endpoint["bearerTokenSecret"] == {"name": "rs-raresignal-metrics-token",
                                             "key": "token"}


def test_an_inline_scrape_token_is_used_and_the_token_can_be_turned_off() -> None:
    objects = manifests(render_chart({"metrics": {"auth": {"token": "my-scrape-token"}}}))
    (secret,) = [s for s in by_kind(objects, "Secret")
                 if s["metadata"]["name"].endswith("-metrics-token")]
    assert base64.b64decode(secret["data"]["token"]) == b"my-scrape-token"
    open_metrics = manifests(render_chart({"metrics": {"auth": {"enabled": False}},
                                           "serviceMonitor": {"enabled": True}},
                                          api_versions=[MONITORING_API]))
    assert not any(s["metadata"]["name"].endswith("-metrics-token")
                   for s in by_kind(open_metrics, "Secret"))
    assert not any(a.startswith("--metrics-token-file") for a in _container(open_metrics)["args"])
    (endpoint,) = _only(open_metrics, "ServiceMonitor")["spec"]["endpoints"]
    assert "bearerTokenSecret" not in endpoint


def test_metrics_over_mutual_tls_are_scraped_with_the_ca_and_a_client_certificate() -> None:
    objects = manifests(render_chart(load_values(MONITORING_TLS), name="rs", namespace="ml",
                                     api_versions=[MONITORING_API]))
    args = _container(objects)["args"]
    assert {"--metrics-tls", "--metrics-omit-run-names",
            "--tls-client-ca=/etc/raresignal/tls/ca.crt"} <= set(args)
    (endpoint,) = _only(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "serverName": "rs-raresignal.ml.svc",
        "ca": {"secret": {"name": "raresignal-server-tls", "key": "ca.crt"}},
        "cert": {"secret": {"name": "raresignal-prometheus-client-tls", "key": "tls.crt"}},
        "keySecret": {"name": "raresignal-prometheus-client-tls", "key": "tls.key"}}


@pytest.mark.parametrize(("values", "message"), [
    ({"metrics": {"tls": True}}, r"metrics\.tls .* needs tls\.enabled"),
    ({"metrics": {"tls": True}, "serviceMonitor": {"enabled": True},
      "tls": {"enabled": True, "existingSecret": "s", "clientAuth": True}},
     r"serviceMonitor\.clientCertificateSecret"),
])
def test_metrics_tls_that_cannot_work_fails_with_a_clear_message(
        values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message):
        render_chart(values, api_versions=[MONITORING_API])


@pytest.mark.parametrize("values_file", [CHART_DIR / "ci" / "defaults-values.yaml",
                                         MONITORING_TLS], ids=lambda p: p.name)
def test_the_server_command_accepts_every_flag_the_chart_passes(values_file: Any) -> None:
    """The container's arguments parse with the real `raresignal server` parser."""
    args = _container(manifests(render_chart(load_values(values_file),
                                             api_versions=[MONITORING_API])))["args"]
    settings = server_settings(build_parser().parse_args(args), {})
    assert settings["metrics_token_file"] == "/etc/raresignal/metrics/token"
    assert settings["max_health_watches"] == load_values(CHART_DIR / "values.yaml")[
        "server"]["maxHealthWatches"]


def test_the_readme_certificate_names_what_training_pods_dial() -> None:
    readme = (CHART_DIR.parent / "README.md").read_text()
    block = readme.split("```yaml\n# certificate.yaml\n", 1)[1].split("```", 1)[0]
    certificate = yaml.safe_load(block)
    assert (certificate["apiVersion"], certificate["kind"]) == ("cert-manager.io/v1",
                                                                "Certificate")
    objects = manifests(render_chart(name="raresignal", namespace="ml"))
    service = _only(objects, "Service")["metadata"]
    assert f"{service['name']}.{service['namespace']}.svc" in certificate["spec"]["dnsNames"]
    # The chart then reads that Secret (tls.existingSecret in the README's command).
    values = {"tls": {"enabled": True, "existingSecret": certificate["spec"]["secretName"]}}
    deployment = _only(manifests(render_chart(values)), "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert f"tls.existingSecret={certificate['spec']['secretName']}" in readme
