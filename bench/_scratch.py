"""A private ``$FHIRTWIN_HOME`` for a bench: its KEK, data keys and state files, removed after.

A bench that writes twins (``TwinStore``, the workers, a pipeline) would otherwise use the
default key store, ``~/.fhirtwin/keys``: every run would leave a data key per patient there
(runs had left 64,000, 256 MB), and a later run would find its patients' keys already made
and under-report what a new patient costs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fhirtwin.crypto import reset_default_keyring

__all__ = ["private_home"]

_VARS = ("FHIRTWIN_HOME", "FHIRTWIN_KEYSTORE", "FHIRTWIN_KEK", "FHIRTWIN_KEK_FILE")


@contextmanager
def private_home(prefix: str) -> Iterator[Path]:
    """Point this process (and the children it starts) at a new temporary home, with no
    KEK or key store of the caller's; restore the environment and remove the folder after."""
    saved = {k: os.environ.get(k) for k in _VARS}
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    for k in _VARS:
        os.environ.pop(k, None)
    os.environ["FHIRTWIN_HOME"] = str(scratch)
    reset_default_keyring()
    try:
        yield scratch
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_default_keyring()
        shutil.rmtree(scratch, ignore_errors=True)
