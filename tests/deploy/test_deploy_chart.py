"""The Helm chart, rendered and linted by the real Helm SDK and validated against the
Kubernetes schemas, for the default values and each ci/*-values.yaml."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    CHART_DIR,
    CI_VALUES,
    DASHBOARD_FILE,
    KUBE_VERSION,
    MONITORING_API,
    RULES_FILE,
    by_kind,
    load_values,
    manifests,
    render_chart,
)

from raresignal.server.alerting.rules import parse_rules
from raresignal.server.serving.app import SERVICE_NAMES
from raresignal.server.serving.auth import parse_tokens

OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
    "app.kubernetes.io/component", "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by", "helm.sh/chart",
)


def _case_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


def _render_case(path: Path) -> list[dict[str, Any]]:
    api_versions = [MONITORING_API] if "monitoring" in path.name else []
    return manifests(render_chart(load_values(path), api_versions=api_versions))


def _server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    return deployment["spec"]["template"]["spec"]


def _tokens_secret(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (secret,) = [s for s in by_kind(objects, "Secret")
                 if s["metadata"]["name"].endswith("-tokens")]
    return secret


def test_ci_values_cover_the_required_cases() -> None:
    assert {_case_id(p) for p in CI_VALUES} >= {"defaults", "tls", "monitoring",
                                                 "existing-secret", "postgresql"}


@pytest.mark.parametrize("values_file", CI_VALUES, ids=_case_id)
def test_helm_lint_strict_reports_no_error_or_warning(values_file: Path) -> None:
    report = helm_python.lint(CHART_DIR, load_values(values_file), strict=True,
                              kube_version="v" + KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values_file", CI_VALUES, ids=_case_id)
def test_every_manifest_is_valid_against_the_kubernetes_schema(values_file: Path) -> None:
    objects = _render_case(values_file)
    core = [obj for obj in objects if obj["kind"] not in OPERATOR_KINDS]
    assert {"Deployment", "Service"} <= {obj["kind"] for obj in core}
    for obj in core:
        # strict: unknown fields are errors, as `kubectl apply --validate=strict` makes them
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_the_schema_validator_rejects_a_misspelt_field() -> None:
    """Guards the check above: strict validation does catch a field Kubernetes lacks."""
    (service,) = by_kind(manifests(render_chart()), "Service")
    service["spec"]["ports"][0]["targetport"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=_case_id)
def test_recommended_labels_on_every_object(values_file: Path) -> None:
    for obj in _render_case(values_file):
        labels = obj["metadata"]["labels"]
        missing = [key for key in RECOMMENDED_LABELS if key not in labels]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "raresignal"


@pytest.mark.parametrize("values_file", CI_VALUES, ids=_case_id)
def test_pod_meets_the_restricted_pod_security_standard(values_file: Path) -> None:
    objects = _render_case(values_file)
    pod = _pod_spec(objects)
    container = _server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    # A read-only root needs writable mounts where the server writes: the database, /tmp.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/data", "/tmp"):
        assert path in mounts and not mounts[path].get("readOnly", False)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "hostPath" not in json.dumps(volumes)
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values_file", CI_VALUES, ids=_case_id)
def test_deployment_writers_grpc_probes_and_named_ports(values_file: Path) -> None:
    values = load_values(values_file)
    objects = _render_case(values_file)
    (deployment,) = by_kind(objects, "Deployment")
    if values.get("database", {}).get("backend") == "postgresql":
        # Replicas share the database: the new pod joins before an old one leaves.
        assert deployment["spec"]["replicas"] == values["replicaCount"] > 1
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    else:
        # One writer: SQLite allows a single process on the volume.
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = _server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "health": 8081, "metrics": 9464}
    assert container["livenessProbe"]["grpc"] == {"port": 8081}
    # Readiness asks for the ingest service, which the server marks NOT_SERVING while its
    # database is unreachable.
    assert container["readinessProbe"]["grpc"] == {"port": 8081,
                                                   "service": SERVICE_NAMES[0]}
    assert "--health-port=8081" in container["args"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    (service,) = by_kind(objects, "Service")
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert service_ports == {"grpc": (50051, "grpc"), "health": (8081, "health"),
                             "metrics": (9464, "metrics")}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_defaults_store_the_database_on_a_claim_and_generate_a_token() -> None:
    objects = manifests(render_chart())
    (claim,) = by_kind(objects, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in _pod_spec(objects)["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    secret = _tokens_secret(objects)
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    token = data["token-default"]
    assert len(token) == 40 and token.isalnum()
    # The tokens file is in the server's own format and grants that token every run.
    assert parse_tokens(data["tokens.yaml"]) == {token: ["*"]}
    args = _server_container(objects)["args"]
    assert "--tokens-file=/etc/raresignal/auth/tokens.yaml" in args
    assert by_kind(objects, "ServiceMonitor") == by_kind(objects, "PrometheusRule") == []


def test_tls_values_mount_the_certificate_and_enable_mutual_tls() -> None:
    objects = _render_case(CHART_DIR / "ci" / "tls-values.yaml")
    args = _server_container(objects)["args"]
    assert {"--tls-cert=/etc/raresignal/tls/tls.crt", "--tls-key=/etc/raresignal/tls/tls.key",
            "--tls-client-ca=/etc/raresignal/tls/ca.crt"} <= set(args)
    volumes = {v["name"]: v for v in _pod_spec(objects)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "raresignal-server-tls"
    assert "emptyDir" in volumes["data"]
    assert by_kind(objects, "PersistentVolumeClaim") == []
    # The TLS Secret is the user's: the chart makes only the tokens and the scrape token.
    assert sorted(s["metadata"]["name"] for s in by_kind(objects, "Secret")) == [
        "rs-raresignal-metrics-token", "rs-raresignal-tokens"]
    secret = _tokens_secret(objects)
    tokens = parse_tokens(base64.b64decode(secret["data"]["tokens.yaml"]).decode())
    assert tokens["team-a-token-0123456789abcdef"] == ["team-a-*"]
    shared = base64.b64decode(secret["data"]["token-shared"]).decode()
    assert tokens[shared] == ["shared-*", "nightly-*"]


def test_inline_tls_material_becomes_a_tls_secret() -> None:
    values = {"tls": {"enabled": True, "cert": "CERT PEM", "key": "KEY PEM"}}
    objects = manifests(render_chart(values))
    (tls,) = [s for s in by_kind(objects, "Secret") if s["type"] == "kubernetes.io/tls"]
    assert base64.b64decode(tls["data"]["tls.crt"]) == b"CERT PEM"
    assert "--tls-client-ca=/etc/raresignal/tls/ca.crt" not in _server_container(objects)["args"]


def test_tls_without_certificate_fails_with_a_clear_message() -> None:
    with pytest.raises(helm_python.HelmError, match=r"tls\.existingSecret, or tls\.cert"):
        render_chart({"tls": {"enabled": True}})


def test_existing_secret_and_claim_are_used_and_nothing_is_generated() -> None:
    objects = _render_case(CHART_DIR / "ci" / "existing-secret-values.yaml")
    assert by_kind(objects, "Secret") == []
    assert by_kind(objects, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in _pod_spec(objects)["volumes"]}
    assert volumes["auth"]["secret"] == {
        "secretName": "raresignal-tokens", "items": [{"key": "tokens.yaml",
                                                       "path": "tokens.yaml"}]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "raresignal-data"
    args = _server_container(objects)["args"]
    assert "--alertmanager-url=http://alertmanager-operated.monitoring.svc:9093" in args
    assert "--rules=/etc/raresignal/rules/rules.yaml" in args
    (rules_map,) = [c for c in by_kind(objects, "ConfigMap")
                    if c["metadata"]["name"].endswith("-rules")]
    # The rules the chart mounts load in the server's own rule parser.
    rules = parse_rules(rules_map["data"]["rules.yaml"], "values")
    assert [rule.alert for rule in rules] == ["NonFiniteGradients"]


def test_values_schema_rejects_typos_and_wrong_types() -> None:
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(chart.merge_values({}))
        for bad in ({"replicas": 2},  # not a key of this chart: top level is closed
                    {"replicaCount": 0},
                    {"database": {"backend": "mysql"}},
                    {"persistence": {"enabeld": False}},
                    {"service": {"ports": {"grpc": "50051"}}},
                    {"server": {"logLevel": "verbose"}},
                    {"auth": {"tokens": [{"name": "a", "token": "short", "runs": ["*"]}]}}):
            with pytest.raises(helm_python.HelmValuesError):
                chart.validate_schema(chart.merge_values(bad))


def test_monitoring_objects_need_both_the_api_and_the_values_flag() -> None:
    values = load_values(CHART_DIR / "ci" / "monitoring-values.yaml")
    without_api = render_chart(values)
    assert by_kind(manifests(without_api), "ServiceMonitor") == []
    assert "does not serve" in without_api["raresignal/templates/NOTES.txt"]
    with_api_only = manifests(render_chart({}, api_versions=[MONITORING_API]))
    assert by_kind(with_api_only, "ServiceMonitor") == []
    assert by_kind(with_api_only, "PrometheusRule") == []
    both = manifests(render_chart(values, api_versions=[MONITORING_API]))
    assert len(by_kind(both, "ServiceMonitor")) == len(by_kind(both, "PrometheusRule")) == 1


# The fields the Prometheus Operator reads from the two custom resources, with the types
# its CRDs (monitoring.coreos.com/v1) declare; unknown fields are errors here, as the API
# server's structural-schema pruning would silently drop them.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name", "namespace", "labels"],
             "properties": {"name": {"type": "string", "maxLength": 253},
                            "namespace": {"type": "string"}, "labels": _LABELS,
                            "annotations": _LABELS}}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
                                          "(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
# The operator's SecretKeySelector and SafeTLSConfig (secret-based: Prometheus reads the
# Secrets from the ServiceMonitor's namespace).
_SECRET_KEY = {"type": "object", "additionalProperties": False, "required": ["name", "key"],
               "properties": {"name": {"type": "string", "minLength": 1},
                              "key": {"type": "string", "minLength": 1},
                              "optional": {"type": "boolean"}}}
_SECRET_OR_CONFIG_MAP = {"type": "object", "additionalProperties": False,
                         "properties": {"secret": _SECRET_KEY, "configMap": _SECRET_KEY}}
_TLS_CONFIG = {"type": "object", "additionalProperties": False,
               "properties": {"ca": _SECRET_OR_CONFIG_MAP, "cert": _SECRET_OR_CONFIG_MAP,
                              "keySecret": _SECRET_KEY, "serverName": {"type": "string"},
                              "insecureSkipVerify": {"type": "boolean"}}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False,
                 "required": ["selector", "endpoints"],
                 "properties": {
                     "selector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchLabels": _LABELS,
                                                 "matchExpressions": {"type": "array"}}},
                     "namespaceSelector": {
                         "type": "object", "additionalProperties": False,
                         "properties": {"any": {"type": "boolean"},
                                        "matchNames": {"type": "array",
                                                       "items": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False,
                         "required": ["port"],
                         "properties": {
                             "port": {"type": "string"}, "path": {"type": "string"},
                             "scheme": {"enum": ["http", "https"]},
                             "interval": _DURATION, "scrapeTimeout": _DURATION,
                             "relabelings": {"type": "array"},
                             "metricRelabelings": {"type": "array"},
                             "bearerTokenSecret": _SECRET_KEY,
                             "tlsConfig": _TLS_CONFIG}}}}}}}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"],
                 "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                     "type": "object", "additionalProperties": False,
                     "required": ["name", "rules"],
                     "properties": {
                         "name": {"type": "string", "minLength": 1},
                         "interval": _DURATION,
                         "rules": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False,
                             "required": ["expr"],
                             "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                             "properties": {
                                 "alert": {"type": "string"}, "record": {"type": "string"},
                                 "expr": {"type": "string", "minLength": 1},
                                 "for": _DURATION, "keep_firing_for": _DURATION,
                                 "labels": _LABELS,
                                 "annotations": _LABELS}}}}}}}}}}


def test_operator_resources_carry_what_the_prometheus_operator_needs() -> None:
    objects = _render_case(CHART_DIR / "ci" / "monitoring-values.yaml")
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (rule,) = by_kind(objects, "PrometheusRule")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    # kube-prometheus-stack selects both by its release label.
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The ServiceMonitor finds the Service and one of its named ports.
    (service,) = by_kind(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items())
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [
        service["metadata"]["namespace"]]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert endpoint_ports == {"metrics"}
    assert endpoint_ports <= {p["name"] for p in service["spec"]["ports"]}


def test_operator_schema_catches_a_misplaced_field() -> None:
    """Guards the check above: the hand-written CRD schema does reject a wrong field."""
    objects = _render_case(CHART_DIR / "ci" / "monitoring-values.yaml")
    (monitor,) = by_kind(objects, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["targetPort"] = 9464
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_prometheus_rule_embeds_the_standalone_rules_file() -> None:
    values = {"prometheusRule": {"enabled": True,
                                 "runbookBaseUrl": "https://runbooks.example.org/raresignal"}}
    (rule,) = by_kind(manifests(render_chart(values, api_versions=[MONITORING_API])),
                      "PrometheusRule")
    expected = yaml.safe_load(RULES_FILE.read_text().replace(
        "https://github.com/raresignal/raresignal/blob/main/helm/README.md",
        "https://runbooks.example.org/raresignal"))
    assert rule["spec"]["groups"] == expected["groups"]
    only_server = {"prometheusRule": {"enabled": True, "rawSeriesAlerts": False}}
    (rule,) = by_kind(manifests(render_chart(only_server, api_versions=[MONITORING_API])),
                      "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["raresignal-server-alerts"]


def test_dashboard_configmap_carries_the_dashboard_file_for_the_sidecar() -> None:
    values = load_values(CHART_DIR / "ci" / "monitoring-values.yaml")
    objects = manifests(render_chart(values, api_versions=[MONITORING_API]))
    (dashboard,) = [c for c in by_kind(objects, "ConfigMap")
                    if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Training"}
    assert json.loads(dashboard["data"]["raresignal.json"]) == json.loads(
        DASHBOARD_FILE.read_text())
    disabled = manifests(render_chart({"dashboard": {"enabled": False}}))
    assert not [c for c in by_kind(disabled, "ConfigMap")
                if c["metadata"]["name"].endswith("-dashboard")]


def test_notes_tell_a_training_pod_where_to_dial_and_where_its_token_is() -> None:
    notes = render_chart(name="rs", namespace="ml")["raresignal/templates/NOTES.txt"]
    assert "RARESIGNAL_SERVER=rs-raresignal.ml.svc:50051" in notes
    assert "name: rs-raresignal-tokens" in notes and "key: token-default" in notes
    open_notes = render_chart({"auth": {"enabled": False}})["raresignal/templates/NOTES.txt"]
    assert "Authentication is OFF" in open_notes
    tls_notes = render_chart(load_values(CHART_DIR / "ci" / "tls-values.yaml"))[
        "raresignal/templates/NOTES.txt"]
    assert "RARESIGNAL_TLS_CA" in tls_notes and "mutual TLS is on" in tls_notes


def test_readme_job_example_matches_the_chart() -> None:
    """The training Job in helm/README.md is valid and reads what the chart writes."""
    readme = (CHART_DIR.parent / "README.md").read_text()
    block = readme.split("```yaml\n# training-job.yaml\n", 1)[1].split("```", 1)[0]
    (job,) = [doc for doc in yaml.safe_load_all(block) if doc]
    kubernetes_validate.validate(job, KUBE_VERSION, strict=True)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RARESIGNAL_SERVER"]["value"] == "raresignal.ml.svc:50051"
    ref = env["RARESIGNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = _tokens_secret(manifests(render_chart(name="raresignal", namespace="ml")))
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]


POSTGRES_VALUES = {"replicaCount": 3,
                   "database": {"backend": "postgresql",
                                "postgresql": {"existingSecret": "team-db"}}}


def test_more_than_one_replica_on_sqlite_fails_with_a_clear_message() -> None:
    with pytest.raises(helm_python.HelmRenderError,
                       match=re.escape("replicaCount=2 needs database.backend=postgresql")):
        render_chart({"replicaCount": 2})


def test_postgresql_without_a_secret_fails_with_a_clear_message() -> None:
    with pytest.raises(helm_python.HelmRenderError,
                       match=re.escape("needs database.postgresql.existingSecret")):
        render_chart({"database": {"backend": "postgresql"}})


def test_postgresql_replicas_read_url_and_password_from_the_secret() -> None:
    objects = manifests(render_chart(POSTGRES_VALUES))
    container = _server_container(objects)
    assert "--db=$(RARESIGNAL_DB_URL)" in container["args"]
    assert "--replica-id=$(POD_NAME)" in container["args"]
    assert "--retention-days=30" in container["args"]
    assert not any("raresignal.db" in arg for arg in container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["RARESIGNAL_DB_URL"]["valueFrom"]["secretKeyRef"] == {"name": "team-db",
                                                                      "key": "url"}
    # The password is a file the server reads (RARESIGNAL_DB_PASSWORD_FILE), never an
    # argument or a plain environment value.
    assert env["RARESIGNAL_DB_PASSWORD_FILE"]["value"] == "/etc/raresignal/db/password"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["db-password"]["mountPath"] == "/etc/raresignal/db"
    volumes = {v["name"]: v for v in _pod_spec(objects)["volumes"]}
    assert volumes["db-password"]["secret"] == {
        "secretName": "team-db", "items": [{"key": "password", "path": "password"}]}
    # No claim: the database is elsewhere, and a ReadWriteOnce claim would pin every
    # replica to one node.
    assert by_kind(objects, "PersistentVolumeClaim") == []
    assert "emptyDir" in volumes["data"]


def test_disruption_budget_only_with_replicas() -> None:
    (budget,) = by_kind(manifests(render_chart(POSTGRES_VALUES)), "PodDisruptionBudget")
    (deployment,) = by_kind(manifests(render_chart(POSTGRES_VALUES)), "Deployment")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == (
        deployment["spec"]["selector"]["matchLabels"])
    kubernetes_validate.validate(budget, KUBE_VERSION, strict=True)
    assert by_kind(manifests(render_chart()), "PodDisruptionBudget") == []
