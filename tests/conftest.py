import atexit
import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# One persistent XLA compilation cache for the whole session (this process and the
# subprocesses it starts): the same program is compiled once instead of once per run,
# which keeps the suite within CI's time. Loading a cached executable runs the same code,
# so hashes are unaffected; the tests whose point is a fresh compile in a fresh process
# (test_reproducibility.py, test_ci_check.py) remove these variables for their processes.
_CACHE = tempfile.mkdtemp(prefix="detjax-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

FRESH_COMPILE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")
