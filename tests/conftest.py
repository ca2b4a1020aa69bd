"""Session setup and the helpers and fixtures several test modules share.

* ``python -m detjax`` in a fresh process: :func:`cli_env`, :func:`detjax_cli`,
  :func:`detjax_train`, :func:`result_line` (import them: ``from conftest import ...``).
* A module's training config and its uninterrupted reference run: the fixtures
  :func:`config_path`, :func:`reference_run` and :func:`copy_of`, driven by the module's
  ``CONFIG`` (and ``FRESH_COMPILE``).
* ``experiments/*.py`` run twice: :func:`run_experiment` and the fixture :func:`two_runs`,
  driven by the module's ``SCRIPT``, ``ARGS`` and ``TWO_RUNS_DIR``.
"""

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


# --------------------------------------------------------- python -m detjax, fresh process


def cli_env(*, fresh_compile: bool = False, **extra: str) -> dict:
    """The environment of a ``python -m detjax`` child: this one with the repository on
    ``PYTHONPATH`` and no ``DETJAX_TEST_KILL_AT`` hook, then ``extra``. ``fresh_compile``
    also turns every compilation cache off (the session's and the CLIs' per-user default), so
    the child compiles for itself."""
    env = dict(os.environ)
    if fresh_compile:
        env = {k: v for k, v in env.items()
               if not k.startswith("JAX_PERSISTENT_CACHE") and k != "JAX_COMPILATION_CACHE_DIR"}
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DETJAX_TEST_KILL_AT", None)
    env.update(extra)
    return env


def detjax_cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m detjax ARGS`` in a fresh process from the repository root (default
    environment :func:`cli_env`); stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "detjax", *map(str, args)], cwd=REPO, env=env or cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


def detjax_train(config_path, out, *extra, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m detjax run CONFIG --out OUT`` without a progress bar, pinned to one CPU
    thread (CPU results depend on the thread count), plus ``extra`` flags."""
    return detjax_cli("run", config_path, "--out", out, "--no-progress", "--cpu-threads", "1", *extra,
                      env=env, timeout=timeout)


def result_line(proc: subprocess.CompletedProcess) -> dict:
    """The JSON result line that ends the stdout of a successful ``python -m detjax run``."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------ a module's config and reference run


@pytest.fixture(scope="module")
def config_path(request, tmp_path_factory):
    """The requesting module's ``CONFIG`` (a ``TrainConfig`` dict) as a JSON file."""
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(request.module.CONFIG))
    return path


@pytest.fixture(scope="module")
def reference_run(request, config_path, tmp_path_factory):
    """An uninterrupted :func:`detjax_train` of :func:`config_path`, once per module:
    ``(run_dir, result)``, ``result`` the run's JSON result line. A module that sets
    ``FRESH_COMPILE = True`` trains without the session's shared compilation cache."""
    out = tmp_path_factory.mktemp("reference") / "run"
    env = cli_env(fresh_compile=getattr(request.module, "FRESH_COMPILE", False))
    return out, result_line(detjax_train(config_path, out, env=env, timeout=600))


@pytest.fixture
def copy_of(reference_run, tmp_path):
    """``copy_of(name)``: a fresh copy of the reference run directory, ``tmp_path / name``."""
    def make(name="copy"):
        return pathlib.Path(shutil.copytree(reference_run[0], tmp_path / name))
    return make


# -------------------------------------------------------------- experiments/*.py, twice


def run_experiment(script: str, *args, timeout: float = 900) -> subprocess.CompletedProcess:
    """``experiments/SCRIPT ARGS`` in a fresh process from the repository root. It shares the
    session's XLA compilation cache: a second identical run loads the compiled program
    instead of recompiling (same executable, same bits)."""
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), *map(str, args)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_runs(request, tmp_path_factory):
    """The requesting module's ``experiments/SCRIPT ARGS --out DIR`` run twice (DIRs ``first``
    and ``second`` below a folder named ``TWO_RUNS_DIR``), both successful:
    ``[(out, stdout), (out, stdout)]``."""
    module = request.module
    base = tmp_path_factory.mktemp(module.TWO_RUNS_DIR)
    runs = []
    for name in ("first", "second"):
        proc = run_experiment(module.SCRIPT, *module.ARGS, "--out", base / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((base / name, proc.stdout))
    return runs
