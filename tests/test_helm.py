"""What an operator relies on in the Helm chart, read from the rendered manifests.

Rendering needs helm-python-sdk (Helm's Go library in a wheel) and kubernetes-validate
(the dev extra); without them these tests are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra)")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_chart", ROOT / "tools" / "check_chart.py")
assert _spec is not None and _spec.loader is not None
check_chart: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_chart)

# the worker kinds `fhirtwin up` runs (fhirtwin/up.py plan()), plus the API
KINDS = {
    "mllp",
    "normalize-hl7v2",
    "normalize-fhir",
    "normalize-csv",
    "normalize-ccda",
    "normalize-notes",
    "assemble",
    "snapshot",
    "audit",
    "results",
    "api",
}
SCENARIOS = {
    "default": {},
    "production": {"values_file": check_chart.PRODUCTION},
}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return list(check_chart.render(**SCENARIOS[request.param]))


def _of(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


# -- checks, each a function of the manifests, so that they can be shown to fail ---------


def _pods(docs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, name, pod spec) of every Deployment and CronJob."""
    pods = [(d["kind"], d["metadata"]["name"], d["spec"]["template"]["spec"])
            for d in _of(docs, "Deployment")]  # fmt: skip
    pods += [
        (d["kind"], d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        for d in _of(docs, "CronJob")
    ]
    return pods


def _fhirtwin_containers(
    docs: list[dict[str, Any]],
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) of every fhirtwin container of a Deployment or CronJob
    (not the demo's Kafka and Redis, not the rules init container)."""
    out = []
    for kind, name, pod in _pods(docs):
        if kind == "Deployment" and "-demo-" in name:
            continue
        for c in pod["containers"]:
            out.append((f"{kind}/{name}/{c['name']}", c, pod))
    return out


def deployment_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Probes (Deployments), limits, non-root, read-only root, no capabilities, for every
    container of every Deployment and CronJob."""
    problems = []
    for kind, name, pod in _pods(docs):
        psc = pod.get("securityContext") or {}
        for c in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext") or {}
            init = c in pod.get("initContainers", [])
            if not init and kind == "Deployment":
                for probe in ("livenessProbe", "readinessProbe"):
                    if not c.get(probe):
                        problems.append(f"{where}: no {probe}")
            limits = (c.get("resources") or {}).get("limits") or {}
            requests = (c.get("resources") or {}).get("requests") or {}
            if not {"cpu", "memory"} <= set(limits) or not {"cpu", "memory"} <= set(requests):
                problems.append(f"{where}: cpu/memory requests and limits missing")
            non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
            user = sc.get("runAsUser", psc.get("runAsUser"))
            if non_root is not True or not user:
                problems.append(f"{where}: not forced to a non-root user")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: privilege escalation allowed")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: writable root file system")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities not dropped")
    return problems


def secrets_in_configmaps(docs: list[dict[str, Any]], secret_values: list[str]) -> list[str]:
    """Secret-looking keys, or any of ``secret_values``, in a ConfigMap's data."""
    problems = []
    for cm in _of(docs, "ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            lowered = key.lower()
            if any(w in lowered for w in ("password", "secret", "token", "kek", "signer")):
                problems.append(f"{cm['metadata']['name']}: key {key}")
            for s in secret_values:
                if s and s in str(value):
                    problems.append(f"{cm['metadata']['name']}: {key} holds a secret value")
    return problems


def scaling_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every Deployment of a worker kind has exactly one HPA or ScaledObject of its own."""
    problems = []
    targets: dict[str, int] = {}
    for d in _of(docs, "HorizontalPodAutoscaler") + _of(docs, "ScaledObject"):
        target = d["spec"]["scaleTargetRef"]["name"]
        targets[target] = targets.get(target, 0) + 1
    for dep in _of(docs, "Deployment"):
        if _component(dep).startswith("demo-"):
            continue
        n = targets.get(dep["metadata"]["name"], 0)
        if n != 1:
            problems.append(f"{dep['metadata']['name']}: {n} scaling rules")
    return problems


def _env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def _kek_secret(c: dict[str, Any], pod: dict[str, Any]) -> str | None:
    """The Secret the container's KEK comes from (FHIRTWIN_KEK by secretKeyRef, or
    FHIRTWIN_KEK_FILE in a mounted Secret volume that holds that file), else None."""
    env = _env(c)
    ref = (env.get("FHIRTWIN_KEK", {}).get("valueFrom") or {}).get("secretKeyRef")
    if ref:
        return str(ref["name"])
    path = env.get("FHIRTWIN_KEK_FILE", {}).get("value")
    if not path:
        return None
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        folder = m["mountPath"].rstrip("/") + "/"
        secret = volumes.get(m["name"], {}).get("secret")
        if secret and path.startswith(folder):
            inside = path[len(folder) :]
            items = secret.get("items")
            if items is None or inside in {i["path"] for i in items}:
                return str(secret["secretName"])
    return None


def key_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every fhirtwin container (Deployments and CronJobs) refuses to run without keys
    (FHIRTWIN_REQUIRE_KEYS=1) and has a KEK from a Secret, a key store and the raw key life."""
    problems = []
    for where, c, pod in _fhirtwin_containers(docs):
        env = _env(c)
        if env.get("FHIRTWIN_REQUIRE_KEYS", {}).get("value") != "1":
            problems.append(f"{where}: no FHIRTWIN_REQUIRE_KEYS=1")
        if not _kek_secret(c, pod):
            problems.append(f"{where}: no KEK from a Secret")
        ks = env.get("FHIRTWIN_KEYSTORE", {})
        if not (ks.get("value") or (ks.get("valueFrom") or {}).get("secretKeyRef")):
            problems.append(f"{where}: no FHIRTWIN_KEYSTORE")
        if not str(env.get("FHIRTWIN_RAW_KEY_DAYS", {}).get("value", "")).isdigit():
            problems.append(f"{where}: no FHIRTWIN_RAW_KEY_DAYS")
    return problems


DEMO = {"values": {"demo": {"enabled": True}}}


# -- the tests ---------------------------------------------------------------------------


def test_manifests_are_valid_kubernetes(docs: list[dict[str, Any]]) -> None:
    assert check_chart.validate(docs) == []


def test_one_deployment_per_worker_kind(docs: list[dict[str, Any]]) -> None:
    comps = [_component(d) for d in _of(docs, "Deployment")]
    assert sorted(comps) == sorted(KINDS)  # each once, none missing


def test_every_deployment_has_probes_limits_and_a_non_root_user(
    docs: list[dict[str, Any]],
) -> None:
    assert deployment_problems(docs) == []
    for dep in _of(docs, "Deployment"):
        c = dep["spec"]["template"]["spec"]["containers"][0]
        for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
            assert c[probe]["httpGet"]["path"] == path
            port = c[probe]["httpGet"]["port"]
            assert port in {p["name"] for p in c["ports"]}, (dep["metadata"]["name"], port)


def test_each_worker_kind_scales_on_its_own(docs: list[dict[str, Any]]) -> None:
    assert scaling_problems(docs) == []
    pdbs = {_component(p) for p in _of(docs, "PodDisruptionBudget")}
    assert pdbs == KINDS


def test_keda_scales_consumers_on_their_groups_lag() -> None:
    docs = check_chart.render(check_chart.PRODUCTION)
    scaled = {_component(s): s for s in _of(docs, "ScaledObject")}
    assert set(scaled) == KINDS - {"mllp", "api"}  # these two consume nothing: HPA on CPU
    groups = set()
    for so in scaled.values():
        kafka = next(t for t in so["spec"]["triggers"] if t["type"] == "kafka")
        assert kafka["metadata"]["sasl"] == "scram_sha512" and kafka["metadata"]["tls"] == "enable"
        assert kafka["authenticationRef"]["name"].endswith("-kafka")
        groups.add(kafka["metadata"]["consumerGroup"])
    assert len(groups) == len(scaled)  # one consumer group per kind
    assert "fhirtwin-normalize-hl7v2" in groups and "fhirtwin-audit-sequencer" in groups
    hpas = {_component(h) for h in _of(docs, "HorizontalPodAutoscaler")}
    assert hpas == {"mllp", "api"}


def test_mllp_service_exposes_2575(docs: list[dict[str, Any]]) -> None:
    svc = next(s for s in _of(docs, "Service") if s["metadata"]["name"].endswith("-mllp"))
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(2575, "mllp")]
    dep = next(d for d in _of(docs, "Deployment") if _component(d) == "mllp")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "mllp", "containerPort": 2575, "protocol": "TCP"} in c["ports"]
    assert "--port=2575" in c["args"] and "--host=0.0.0.0" in c["args"]


def test_secrets_come_from_kubernetes_secrets_never_configmaps() -> None:
    docs = check_chart.render(check_chart.PRODUCTION)
    assert secrets_in_configmaps(docs, []) == []
    assert not _of(docs, "Secret")  # the chart creates no Secret: it references them
    refs: set[str] = set()
    for dep in _of(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for c in pod["containers"]:
            for e in c.get("env", []):
                if "SECRET" in e["name"] or "PASSWORD" in e["name"] or "SIGNER" in e["name"]:
                    assert "valueFrom" in e and "value" not in e, e
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    refs.add(ref["name"])
        refs |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert {
        "fhirtwin-kafka-credentials",
        "fhirtwin-redis-acl",
        "fhirtwin-kek",
        "fhirtwin-keystore",
        "fhirtwin-audit-signer",
        "fhirtwin-api-signing-key",
        "kafka-cluster-ca",
    } <= refs
    # the Redis password reaches the URL through Kubernetes' $(VAR) expansion, not in clear
    for dep in _of(docs, "Deployment"):
        env = dep["spec"]["template"]["spec"]["containers"][0].get("env", [])
        urls = [e["value"] for e in env if e["name"] == "FHIRTWIN_REDIS"]
        if urls:
            assert "$(FHIRTWIN_REDIS_PASSWORD)@" in urls[0] and urls[0].startswith("rediss://")


def test_rules_come_from_a_configmap_without_rebuilding() -> None:
    docs = check_chart.render(check_chart.PRODUCTION)
    dep = next(d for d in _of(docs, "Deployment") if _component(d) == "normalize-hl7v2")
    pod = dep["spec"]["template"]["spec"]
    assert any(v.get("configMap", {}).get("name") == "fhirtwin-rules" for v in pod["volumes"])
    assert pod["initContainers"][0]["name"] == "rules"
    assert "--mappings=/etc/fhirtwin/rules/mappings" in pod["containers"][0]["args"]
    cm = _of(docs, "ConfigMap")[0]["data"]
    assert cm["FHIRTWIN_MAPPINGS"] == "/etc/fhirtwin/rules/mappings"
    assert cm["FHIRTWIN_NLP"] == "/etc/fhirtwin/rules/nlp"
    assert cm["FHIRTWIN_KAFKA_CONF_SECURITY_PROTOCOL"] == "SASL_SSL"


def test_service_monitor_scrapes_every_component() -> None:
    docs = check_chart.render(check_chart.PRODUCTION)
    (sm,) = _of(docs, "ServiceMonitor")
    labels = sm["spec"]["selector"]["matchLabels"]
    scraped = [
        s
        for s in _of(docs, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in labels.items())
    ]
    assert {_component(s) for s in scraped} == KINDS
    assert all(s["spec"]["ports"][0]["name"] == "metrics" for s in scraped)
    assert not _of(check_chart.render(), "ServiceMonitor")  # off by default


def test_every_container_has_the_keys(docs: list[dict[str, Any]]) -> None:
    assert key_problems(docs) == []
    assert len(_fhirtwin_containers(docs)) == len(KINDS) + 1  # the Deployments and the CronJob


def test_redis_cluster_reaches_the_pods_with_database_0() -> None:
    """fhirtwin.redisconn.connect reads FHIRTWIN_REDIS_CLUSTER; a cluster has only db 0."""
    docs = check_chart.render(check_chart.PRODUCTION)
    assert _of(docs, "ConfigMap")[0]["data"]["FHIRTWIN_REDIS_CLUSTER"] == "true"
    for dep in _of(docs, "Deployment"):
        env = dep["spec"]["template"]["spec"]["containers"][0].get("env", [])
        for url in [e["value"] for e in env if e["name"] == "FHIRTWIN_REDIS"]:
            assert url.split("?")[0].endswith(":6380/0"), url
    default = check_chart.render()
    assert _of(default, "ConfigMap")[0]["data"]["FHIRTWIN_REDIS_CLUSTER"] == "false"
    with pytest.raises(Exception, match=r"redis\.db must be 0"):
        check_chart.render(check_chart.PRODUCTION, values={"redis": {"db": 2}})


def test_production_containers_take_kek_and_key_store_from_their_secrets() -> None:
    docs = check_chart.render(check_chart.PRODUCTION)
    assert key_problems(docs) == []
    for where, c, pod in _fhirtwin_containers(docs):
        assert _kek_secret(c, pod) == "fhirtwin-kek", where
        ref = _env(c)["FHIRTWIN_KEYSTORE"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "fhirtwin-keystore", "key": "url"}, where
        assert "value" not in _env(c)["FHIRTWIN_KEYSTORE"]


def test_mllp_listener_has_the_keys() -> None:
    """The MLLP listener seals raw records with epoch keys: same KEK and key store."""
    docs = check_chart.render(
        check_chart.PRODUCTION, {"secrets": {"kekPrevious": {"existingSecret": "fhirtwin-kek-old"}}}
    )
    dep = next(d for d in _of(docs, "Deployment") if _component(d) == "mllp")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = _env(c)
    assert env["FHIRTWIN_REQUIRE_KEYS"]["value"] == "1"
    assert _kek_secret(c, pod) == "fhirtwin-kek"
    assert env["FHIRTWIN_KEYSTORE"]["valueFrom"]["secretKeyRef"]["name"] == "fhirtwin-keystore"
    assert env["FHIRTWIN_KEK_PREVIOUS"]["valueFrom"]["secretKeyRef"]["name"] == "fhirtwin-kek-old"
    assert "FHIRTWIN_REDIS" not in env  # still no twin store for the listener


def test_without_secrets_pods_wait_for_the_default_named_secrets() -> None:
    docs = check_chart.render()  # the default values: no Secret set, no demo
    assert not _of(docs, "Secret")
    for where, c, pod in _fhirtwin_containers(docs):
        assert _kek_secret(c, pod) == "ft-fhirtwin-kek", where
        ref = _env(c)["FHIRTWIN_KEYSTORE"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "ft-fhirtwin-keystore", where


def test_demo_makes_a_kek_secret_and_keeps_keys_in_database_1_of_its_redis() -> None:
    import base64

    docs = check_chart.render(**DEMO)
    assert key_problems(docs) == []
    (secret,) = _of(docs, "Secret")
    name = secret["metadata"]["name"]
    kek = base64.b64decode(base64.b64decode(secret["data"]["kek"]), validate=True)
    assert len(kek) == 32
    redis_svc = next(s for s in _of(docs, "Service") if _component(s) == "demo-redis")
    for where, c, pod in _fhirtwin_containers(docs):
        env = _env(c)
        assert _kek_secret(c, pod) == name, where
        store = env["FHIRTWIN_KEYSTORE"]["value"]
        assert store == f"redis://{redis_svc['metadata']['name']}:6379/1", where
        if "FHIRTWIN_REDIS" in env:  # the twin store: the same Redis, another database
            assert env["FHIRTWIN_REDIS"]["value"].endswith(":6379/0"), where
    # made at random where `lookup` finds nothing (helm template); kept across upgrades
    again = _of(check_chart.render(**DEMO), "Secret")[0]
    assert again["data"]["kek"] != secret["data"]["kek"]
    template = (check_chart.CHART / "templates" / "kek-secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in template
    # a Secret of the user's own: the chart makes none and uses it
    own = check_chart.render(values={"demo": {"enabled": True},
                                     "secrets": {"kek": {"existingSecret": "my-kek"}}})  # fmt: skip
    assert not _of(own, "Secret")
    assert {_kek_secret(c, pod) for _, c, pod in _fhirtwin_containers(own)} == {"my-kek"}


def test_a_cronjob_expires_epoch_keys_daily(docs: list[dict[str, Any]]) -> None:
    (cron,) = _of(docs, "CronJob")
    assert _component(cron) == "keys-expire"
    assert cron["spec"]["schedule"] == "17 3 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["keys", "expire"]
    assert deployment_problems(docs) == []  # non-root, read-only root, limits: CronJob too
    off = check_chart.render(values={"keys": {"expire": {"enabled": False}}})
    assert not _of(off, "CronJob")


def test_raw_topics_keep_records_as_long_as_their_epoch_keys() -> None:
    raw = ["ehr.hl7v2", "ehr.fhir", "ehr.csv", "ehr.ccda", "ehr.notes", "twin.deadletter"]
    for days in (7, 3):
        docs = check_chart.render(check_chart.PRODUCTION, {"keys": {"rawDays": days}})
        (job,) = _of(docs, "Job")
        script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
        assert f'ConfigEntry("retention.ms", "{days * 86_400_000}"' in script
        assert "incremental_alter_configs" in script
        listed = script.split("raw = [", 1)[1].split("]", 1)[0]
        assert sorted(t.strip(' "') for t in listed.split(",")) == sorted(raw)
        for where, c, _ in _fhirtwin_containers(docs):
            assert _env(c)["FHIRTWIN_RAW_KEY_DAYS"]["value"] == str(days), where
    # the script is Python that compiles (it is run by `python -c` in the Job)
    compile(script, "topics-job", "exec")


# -- the checks can fail --------------------------------------------------------------


def test_the_checks_catch_a_broken_chart() -> None:
    broken = check_chart.render(
        values={
            "securityContext": {"readOnlyRootFilesystem": False, "capabilities": {"drop": []}},
            "podSecurityContext": {"runAsNonRoot": False},
            "components": {"assemble": {"resources": {"limits": None}}},  # null: unset
        }
    )
    problems = deployment_problems(broken)
    assert any("writable root" in p for p in problems)
    assert any("non-root" in p for p in problems)
    assert any("assemble" in p and "limits" in p for p in problems)
    assert any("capabilities" in p for p in problems)

    docs = check_chart.render(check_chart.PRODUCTION)
    cm = _of(docs, "ConfigMap")[0]
    cm["data"]["FHIRTWIN_KAFKA_CONF_SASL_PASSWORD"] = "hunter2"
    assert secrets_in_configmaps(docs, ["hunter2"])

    hpa = _of(docs, "HorizontalPodAutoscaler")[0]
    docs.remove(hpa)
    assert scaling_problems(docs)

    keyless = check_chart.render(check_chart.PRODUCTION)
    mllp = next(d for d in _of(keyless, "Deployment") if _component(d) == "mllp")
    mllp_c = mllp["spec"]["template"]["spec"]["containers"][0]
    mllp_c["env"] = [e for e in mllp_c["env"] if e["name"] != "FHIRTWIN_REQUIRE_KEYS"]
    (cron,) = _of(keyless, "CronJob")
    cron_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cron_pod["volumes"] = [v for v in cron_pod["volumes"] if v["name"] != "kek"]
    api = next(d for d in _of(keyless, "Deployment") if _component(d) == "api")
    api_c = api["spec"]["template"]["spec"]["containers"][0]
    api_c["env"] = [e for e in api_c["env"] if e["name"] != "FHIRTWIN_KEYSTORE"]
    problems = key_problems(keyless)
    assert any("mllp" in p and "REQUIRE_KEYS" in p for p in problems)
    assert any("keys-expire" in p and "KEK" in p for p in problems)
    assert any("-api/" in p and "KEYSTORE" in p for p in problems)
    assert len(problems) == 3

    broken_cron = check_chart.render(values={"securityContext": {"readOnlyRootFilesystem": False},
                                             "keys": {"expire": {"resources": {"limits": None}}}})  # fmt: skip
    problems = deployment_problems(broken_cron)
    assert any("keys-expire" in p and "writable root" in p for p in problems)
    assert any("keys-expire" in p and "limits" in p for p in problems)

    bad = check_chart.render()
    bad[0].setdefault("spec", {})["replicaz"] = 3  # an unknown field: strict schemas refuse it
    so = check_chart.render(check_chart.PRODUCTION)
    scaled = _of(so, "ScaledObject")[0]
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 200  # KEDA wants strings
    assert check_chart.validate(bad) and check_chart.validate([scaled])


def test_check_chart_passes() -> None:
    assert check_chart.main([]) == 0


def test_every_container_runs_a_real_fhirtwin_command() -> None:
    """The chart's args parse as `fhirtwin` commands with options that exist."""
    from typer.testing import CliRunner

    from fhirtwin.cli import app

    runner = CliRunner()
    for values_file in (None, check_chart.PRODUCTION):
        for where, c, _ in _fhirtwin_containers(check_chart.render(values_file)):
            args = c["args"]
            result = runner.invoke(app, [*args, "--help"])
            assert result.exit_code == 0, (where, args, result.output)


def test_dockerfile_copies_what_exists_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text.rsplit("\nFROM ", 1)[1]  # the runtime stage
    copies = [
        line.split()[1:-1]
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
    ]
    assert copies
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), src
            assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, src
    assert 'ENTRYPOINT ["fhirtwin"]' in final
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fhirtwin"] == "fhirtwin.cli:main"  # the CLI, with its heap settled
    assert "USER 10001" in final and "COPY --from=build" in final
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in final, tool  # nothing is built or installed in the final image
    uid = next(line for line in final.splitlines() if line.startswith("USER ")).split()[1]
    assert not uid.startswith("0") and uid.split(":")[0] != "root"
