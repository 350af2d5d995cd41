"""Render and validate the Helm chart offline: no helm binary, no cluster.

    .venv/bin/python tools/check_chart.py [--kube-version 1.30.0] [--chart helm/fhirtwin]

For each scenario (the default values; ``helm/fhirtwin/ci/production-values.yaml``:
external Kafka with SASL_SSL, Redis Cluster, KEDA on; and the demo install):

1. ``helm lint`` through helm-python-sdk (Helm's Go library in a wheel);
2. render the chart, as ``helm template`` would;
3. validate every manifest against the Kubernetes API schemas of ``--kube-version``
   (kubernetes-validate, which bundles them; strict: unknown fields are errors), and the
   custom resources (KEDA ScaledObject and TriggerAuthentication, Prometheus Operator
   ServiceMonitor) against the schemas below, which hold the fields this chart uses.

Prints one line per scenario and every problem; exits 1 on any problem.
``render()`` is what tests/test_helm.py uses.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fhirtwin"
PRODUCTION = CHART / "ci" / "production-values.yaml"
KUBE_VERSION = "1.30.0"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}},
}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
}

# The parts of the CRDs' OpenAPI schemas (KEDA v2 keda.sh/v1alpha1, Prometheus Operator
# monitoring.coreos.com/v1) that this chart uses; unknown fields are errors, as in strict mode.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string", "minLength": 1},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "advanced": {"type": "object"},
                    "fallback": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string", "minLength": 1},
                                "name": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": _STR_MAP,  # KEDA reads map[string]string
                                "authenticationRef": _NAME_REF,
                                "useCachedMetrics": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {
                                "parameter": {"type": "string", "minLength": 1},
                                "name": {"type": "string", "minLength": 1},
                                "key": {"type": "string", "minLength": 1},
                            },
                        },
                    },
                    "env": {"type": "array"},
                    "podIdentity": {"type": "object"},
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "properties": {"matchLabels": _STR_MAP, "matchExpressions": {}},
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "targetPort": {},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {
                                    "type": "string",
                                    "pattern": "^[0-9]+(ms|s|m|h)$",
                                },
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "default values": {},
    "production (SASL_SSL Kafka, Redis Cluster, KEDA)": {"values_file": PRODUCTION},
    "demo": {"values": {"demo": {"enabled": True}}},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def values_of(
    values_file: Path | str | None = None, values: dict[str, Any] | None = None
) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    if values_file:
        merged = yaml.safe_load(Path(values_file).read_text()) or {}
    return _merge(merged, values or {})


def render(
    values_file: Path | str | None = None,
    values: dict[str, Any] | None = None,
    *,
    chart: Path = CHART,
    release: str = "ft",
    namespace: str = "fhirtwin",
) -> list[dict[str, Any]]:
    """Every manifest the chart renders (``helm template``), as dicts, in file order."""
    import helm_python as helm

    with helm.Chart.load(str(chart)) as loaded:
        files = loaded.render(
            values_of(values_file, values), name=release, namespace=namespace, is_install=True
        )
    docs: list[dict[str, Any]] = []
    for name in sorted(files):
        if not name.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(files[name]):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["metadata"]["annotations"] = doc["metadata"]["annotations"] or {}
                docs.append(doc)
    return docs


def lint(
    values_file: Path | str | None = None,
    values: dict[str, Any] | None = None,
    *,
    chart: Path = CHART,
    kube_version: str = KUBE_VERSION,
) -> list[str]:
    """``helm lint --strict``: the errors and warnings, as text."""
    import helm_python as helm

    result = helm.lint(
        str(chart), values_of(values_file, values), strict=True, kube_version=kube_version
    )
    problems = [f"lint error: {e}" for e in result.get("errors") or []]
    for m in result.get("messages") or []:
        if int(m.get("severity", 0)) >= 2:  # 1 info, 2 warning, 3 error
            problems.append(f"lint: {m.get('path')}: {m.get('error')}")
    return problems


def validate(docs: list[dict[str, Any]], kube_version: str = KUBE_VERSION) -> list[str]:
    """Problems of the manifests against the Kubernetes (and the CRDs') schemas."""
    import jsonschema
    import kubernetes_validate

    problems: list[str] = []
    for doc in docs:
        kind, api = doc.get("kind", "?"), doc.get("apiVersion", "?")
        name = f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}"
        crd = CRD_SCHEMAS.get((api, kind))
        if crd is not None:
            for err in jsonschema.Draft7Validator(crd).iter_errors(doc):
                where = "/".join(str(p) for p in err.absolute_path)
                problems.append(f"{name}: {where}: {err.message}")
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema for {api} {kind} in Kubernetes {kube_version}")
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            problems.append(f"{name}: {where}: {exc.message}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chart", type=Path, default=CHART)
    ap.add_argument("--kube-version", default=KUBE_VERSION)
    args = ap.parse_args(argv)
    failed = 0
    for title, sc in SCENARIOS.items():
        problems: list[str] = []
        try:
            problems += lint(sc.get("values_file"), sc.get("values"), chart=args.chart,
                             kube_version=args.kube_version)  # fmt: skip
            docs = render(sc.get("values_file"), sc.get("values"), chart=args.chart)
            problems += validate(docs, args.kube_version)
        except Exception as exc:  # a template error: helm's message says where
            docs = []
            problems.append(f"render: {type(exc).__name__}: {exc}")
        kinds = Counter(d.get("kind", "?") for d in docs)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"{title}: {len(docs)} manifests ({summary}): {status}")
        for p in problems:
            print(f"  - {p}")
        failed += bool(problems)
    print(
        f"chart {args.chart.relative_to(ROOT) if args.chart.is_relative_to(ROOT) else args.chart}: "
        f"{len(SCENARIOS) - failed} of {len(SCENARIOS)} scenarios valid "
        f"against Kubernetes {args.kube_version}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
