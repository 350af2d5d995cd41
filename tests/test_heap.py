"""fhirtwin.heap: the collector is tuned only in fhirtwin's own processes."""

from __future__ import annotations

import gc
import subprocess
import sys

from fhirtwin import heap


def test_a_program_that_imports_fhirtwin_keeps_its_collector() -> None:
    before = (gc.get_threshold(), gc.get_freeze_count())
    heap.settle()
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_the_fhirtwin_command_settles_its_heap() -> None:
    code = (
        "import gc, sys\n"
        "from fhirtwin import cli, heap\n"
        "sys.argv = ['fhirtwin', '--help']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "heap.settle()\n"
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 1000)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split()[-2:] == [str(heap.YOUNG_THRESHOLD), "True"]
