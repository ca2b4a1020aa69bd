"""Every command line refuses bad arguments before any heavy work: one ``error:`` line, exit 2,
no traceback.

The sweep runs each CLI's ``main`` in this process with the process set-up
(``configure_process``, the first step after validation) replaced by a tripwire, so a bad
value that got past validation fails the test at once instead of loading data. A few cases
run as real subprocesses, to check the exit status, stderr and the time to refuse.
"""

import importlib.util
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_env

import detjax.cli


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_validation_{name}", REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clis():
    saved = list(sys.path)
    try:
        modules = {name: _load(name) for name in ("ptbxl", "medmnist", "cinc2017", "seed_study")}
    finally:
        sys.path[:] = saved  # medmnist.py reorders sys.path when imported
    import detjax.__main__ as detjax_main

    modules["detjax"] = detjax_main
    return modules


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    config = tmp_path / "config.json"
    config.write_text('{"task": "synthetic", "arch": "tiny", "epochs": 1}')
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    unknown_key = tmp_path / "unknown.json"
    unknown_key.write_text('{"task": "synthetic", "nonsense": 1}')
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"file": str(a_file), "under_file": str(a_file / "run"), "missing": str(tmp_path / "missing"),
            "config": str(config), "bad_json": str(bad_json), "unknown_key": str(unknown_key),
            "empty": str(empty), "out": str(tmp_path / "new-run")}


def _common(p):
    """Bad values of the flags every experiment CLI shares (detjax.cli.add_common_flags)."""
    return [
        ["--cpu-threads", "0"], ["--cpu-threads", "-1"], ["--cpu-threads", "two"],
        ["--devices", "0"], ["--devices", "-2"],
        ["--epochs", "0"], ["--epochs", "-5"], ["--epochs", "1.5"],
        ["--batch-size", "0"], ["--limit", "0"], ["--seed", "-1"], ["--seed", str(2 ** 32)],
        ["--data-dir", p["missing"]], ["--data-dir", p["file"]],
        ["--out", p["file"]], ["--out", p["under_file"]],
        ["--resume"], ["--resume", "--out", p["missing"]], ["--resume", "--out", p["empty"]],
        ["--allow-device-change"], ["--init", "nonsense"], ["--order", "random"],
        ["--compile-cache", p["file"]], ["--compile-cache", p["under_file"]],
    ]


def _cases(p):
    cases = []
    for flags in _common(p):
        cases += [("ptbxl", flags), ("medmnist", flags)]
        # cinc2017 needs a data folder; give a valid one unless the case is about it
        cases.append(("cinc2017", flags if "--data-dir" in flags else ["--data-dir", p["empty"], *flags]))
    cases += [
        ("ptbxl", ["--leads", "I,XYZ"]), ("ptbxl", ["--eval-every", "0"]), ("ptbxl", ["--cv-fold", "3"]),
        ("ptbxl", ["--arch", "baseline", "--transformer-fixup"]),
        ("medmnist", ["--flag", "nosuchmnist"]), ("medmnist", ["--size", "64"]),
        ("medmnist", ["--eval-every", "-1"]),
        ("cinc2017", []),  # no --data-dir and no $DETJAX_CINC2017_DIR
        ("cinc2017", ["--data-dir", p["empty"], "--window-seconds", "0"]),
        ("cinc2017", ["--data-dir", p["empty"], "--window-seconds", "nan"]),
        ("cinc2017", ["--data-dir", p["empty"], "--window-seconds", "2.555"]),
        ("cinc2017", ["--data-dir", p["empty"], "--sampling-rate", "0"]),
        ("seed_study", ["--epochs", "1"]),  # no --task
        ("seed_study", ["--task", "synthetic"]),  # no --epochs
    ]
    study = ["--task", "synthetic", "--epochs", "1"]
    for flags in (["--epochs", "0"], ["--seeds", "0"], ["--seeds", "21"], ["--seed-list", "a,b"],
                  ["--seed-list", "3,3"], ["--seed-list", "-1"], ["--delta", "0"], ["--delta", "inf"],
                  ["--group-size", "-1"], ["--cpu-threads", "0"], ["--limit", "0"], ["--width", "0"],
                  ["--batch-size", "-1"], ["--eval-every", "0"], ["--window-seconds", "-1"],
                  ["--data-dir", p["missing"]], ["--out", p["file"]], ["--compile-cache", p["file"]],
                  ["--arms", "dct,nonsense"], ["--arms", ","], ["--mode", "parallel"]):
        cases.append(("seed_study", study + flags))
    cases += [("seed_study", ["--report-only"]), ("seed_study", ["--report-only", "--out", p["missing"]])]
    run = ["run", p["config"], "--out", p["out"]]
    cases += [
        ("detjax", run + ["--cpu-threads", "0"]), ("detjax", run + ["--devices", "0"]),
        ("detjax", ["run", p["missing"], "--out", p["out"]]), ("detjax", ["run", p["bad_json"], "--out", p["out"]]),
        ("detjax", ["run", p["unknown_key"], "--out", p["out"]]), ("detjax", ["run", p["config"], "--out", p["file"]]),
        ("detjax", run + ["--resume"]), ("detjax", ["run", p["config"], "--out", p["empty"], "--resume"]),
        ("detjax", run + ["--allow-device-change"]), ("detjax", ["run", p["config"]]),
        ("detjax", run + ["--compile-cache", p["file"]]), ("detjax", ["env", "--compile-cache", p["file"]]),
        ("detjax", ["verify", p["missing"]]), ("detjax", ["verify", p["empty"]]), ("detjax", ["verify", p["file"]]),
        ("detjax", ["verify", p["empty"], "--out", p["file"]]),
        ("detjax", ["env", "--cpu-threads", "0"]), ("detjax", ["env", "--devices", "-1"]),
    ]
    return cases


def test_every_cli_refuses_bad_values_before_any_work(clis, paths, monkeypatch, capsys):
    def tripwire(*args, **kwargs):
        raise AssertionError("validation let a bad value through to the process set-up")

    monkeypatch.setattr(detjax.cli, "configure_process", tripwire)
    monkeypatch.setattr(clis["seed_study"], "configure_process", tripwire)
    monkeypatch.delenv("DETJAX_CINC2017_DIR", raising=False)
    failures = []
    cases = _cases(paths)
    for name, argv in cases:
        try:
            code = clis[name].main(list(argv))
        except SystemExit as exc:
            code = exc.code
        except AssertionError as exc:
            code = f"AssertionError: {exc}"
        err = capsys.readouterr().err
        error_lines = [line for line in err.splitlines() if "error:" in line]
        if code != 2 or len(error_lines) != 1 or "Traceback" in err:
            failures.append(f"{name} {' '.join(argv)} -> exit {code}, stderr {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert len(cases) > 100


def test_valid_arguments_pass_validation(clis, paths, monkeypatch):
    """The validators do not refuse good values (the tripwire is reached instead)."""
    reached = []

    def tripwire(*args, **kwargs):
        reached.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(detjax.cli, "configure_process", tripwire)
    monkeypatch.setattr(clis["seed_study"], "configure_process", tripwire)
    for name, argv in [("ptbxl", ["--epochs", "1", "--cpu-threads", "2", "--out", paths["out"]]),
                       ("medmnist", ["--flag", "breastmnist", "--devices", "1", "--out", paths["out"]]),
                       ("cinc2017", ["--data-dir", paths["empty"], "--window-seconds", "2.5", "--out", paths["out"]]),
                       ("seed_study", ["--task", "synthetic", "--epochs", "1", "--seeds", "2", "--out", paths["out"]])]:
        with pytest.raises(SystemExit) as info:
            clis[name].main(argv)
        assert info.value.code == 0, name
    assert len(reached) == 4


@pytest.mark.parametrize("argv", [
    ["experiments/ptbxl.py", "--cpu-threads", "0"],
    ["experiments/ptbxl.py", "--epochs", "1", "--out", "/dev/null/run"],
    ["experiments/seed_study.py", "--task", "synthetic", "--epochs", "0"],
    ["-m", "detjax", "run", "tests/test_cli_validation.py", "--out", "/nonexistent-root/x", "--resume"],
])
def test_refusals_in_a_fresh_process_are_one_line_and_fast(argv):
    env = cli_env()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sum("error:" in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s to refuse: validation must come before data loading"


def test_allocator_jemalloc_restarts_the_command_with_the_library_preloaded(tmp_path):
    """``--allocator jemalloc`` re-executes the command with ``LD_PRELOAD`` (here libm stands in
    for jemalloc, so the test needs no jemalloc) and the fingerprint records it; a library
    that is not there is a clear error, not a silent run without it."""
    import json
    import subprocess
    import sys

    from conftest import cli_env

    def env_cmd(library):
        return subprocess.run([sys.executable, "-m", "detjax", "env", "--allocator", "jemalloc", "--cpu-threads", "1"],
                              capture_output=True, text=True, timeout=300,
                              env={**cli_env(), "DETJAX_JEMALLOC": library})

    ran = env_cmd("libm.so.6")
    assert ran.returncode == 0, ran.stderr
    allocator = json.loads(ran.stdout)["host_allocator"]
    assert allocator["ld_preload"][0] == "libm.so.6"
    assert allocator["settings"]["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"
    missing = env_cmd(str(tmp_path / "libjemalloc.so.2"))
    assert missing.returncode != 0 and "is not a file" in missing.stderr
