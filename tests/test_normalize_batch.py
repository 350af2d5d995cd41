"""The normalize worker's batch handler on a real Redis: a record that trips a bug costs that
record alone (a dead letter with its original bytes); the records around it are resolved
once, as they would be without it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fhirtwin import bus, crypto
from fhirtwin.crypto import open_event, reset_default_keyring
from fhirtwin.normalize import NormalizeWorker

from . import synth


def _records(n: int, base: int) -> list[bus.Record]:
    tmpl = synth.templates()
    return [
        bus.Record(
            bus.RAW_TOPICS["hl7v2"],
            0,
            i,
            1_790_000_000_000 + i,
            None,
            synth.message(base + i, 10_000_000, tmpl),  # one new patient each
            (("fhirtwin-source-kind", b"hl7v2"),),
        )
        for i in range(n)
    ]


def _decisions(worker: NormalizeWorker, outs: list[list[Any]]) -> list[Any]:
    got: list[Any] = []
    for per in outs:
        if per[0].topic == bus.DEADLETTER:
            got.append(dict(per[0].headers)["fhirtwin-dl-stage"].decode())
            continue
        (ev,) = [o for o in per if o.topic == bus.RESOURCES]
        body = orjson.loads(open_event(worker.resolver.keys, ev.key.decode(), ev.value))
        got.append(body["identity"]["rule"])
    return got


def test_a_record_that_trips_a_bug_is_dead_lettered_alone(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = NormalizeWorker("127.0.0.1:1", redis_url, validate=False)  # handle(): no broker
    recs = _records(3, 4_000_000)
    route = worker._route

    def flaky(sealed: bus.Record, *rest: Any) -> Any:
        if sealed.offset == 1:
            raise KeyError("a bug in a rule's code")
        return route(sealed, *rest)

    monkeypatch.setattr(worker, "_route", flaky)
    outs = worker.stream._handle(recs)  # as the stream runtime calls the handler
    # the records around the failing one are resolved once: their patients are new
    assert _decisions(worker, outs) == ["new", "internal", "new"]
    dead = outs[1][0]
    assert dead.value == recs[1].value  # the original bytes, to replay after a fix
    reason = worker.resolver.keys.open_raw(dict(dead.headers)["fhirtwin-dl-reason"])
    assert reason.startswith(b"KeyError")

    monkeypatch.setattr(worker, "_route", route)  # the fix: replaying the dead letter works
    assert _decisions(worker, worker.handle([recs[1]])) == ["new"]


def test_a_batch_of_new_patients_syncs_their_keys_once_before_returning(
    redis_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FHIRTWIN_HOME", str(tmp_path))
    monkeypatch.delenv("FHIRTWIN_KEYSTORE", raising=False)
    reset_default_keyring()
    synced: list[int] = []
    make_durable = crypto._make_durable
    monkeypatch.setattr(
        crypto,
        "_make_durable",
        lambda root, paths: (synced.append(len(paths)), make_durable(root, paths)),
    )
    try:
        worker = NormalizeWorker("127.0.0.1:1", redis_url, validate=False)
        outs = worker.handle(_records(4, 5_000_000))
        assert _decisions(worker, outs) == ["new"] * 4
        keys = [p for p in (tmp_path / "keys" / "twin").rglob("*") if p.is_file()]
        # one key per new patient, every one on disk (mode 0600) before the events that
        # are sealed with them leave the handler; one sync for the batch
        assert len(keys) == 4 and {p.stat().st_mode & 0o777 for p in keys} == {0o600}
        assert synced == [4]
    finally:
        reset_default_keyring()
