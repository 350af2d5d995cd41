"""Shared fixtures: the corpus location, and the rule that CI may not skip it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
