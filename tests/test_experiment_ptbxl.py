"""`experiments/ptbxl.py` end to end on a tiny subset of the vendored sample, twice."""

import json

from conftest import run_experiment

# The fixture two_runs (tests/conftest.py) runs SCRIPT with ARGS twice, sharing the session's
# XLA compilation cache: the second run loads the compiled program (same executable, same bits).
SCRIPT, TWO_RUNS_DIR = "ptbxl.py", "ptbxl"
ARGS = ["--arch", "conformer", "--init", "mixed", "--epochs", "1", "--limit", "24", "--batch-size", "8",
        "--cpu-threads", "1", "--no-progress"]


def _run(out, *extra):
    return run_experiment(SCRIPT, *ARGS, "--out", out, *extra)


def test_cli_writes_the_expected_files(two_runs):
    out, stdout = two_runs[0]
    for name in ("result.json", "manifest.json", "training_curve.png"):
        assert (out / name).is_file(), name
    assert any((out / "checkpoints").iterdir())
    result = json.loads((out / "result.json").read_text())
    for key in ("macro_auc", "per_class_auc", "init_sha256", "final_sha256", "init_md5", "final_md5", "n_params"):
        assert key in result, key
    assert result["n_params"] == 1_827_634
    assert list(result["per_class_auc"]) == ["SR", "AFIB", "STACH", "SARRH", "SBRAD", "PACE", "SVARR", "BIGU",
                                             "AFLT", "SVTAC", "PSVT", "TRIGU"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["task"] == "ptbxl" and manifest["config"]["data"]["limit"] == 24
    assert manifest["data_info"]["source"]
    # The printed report names the hashes and the run directory.
    assert result["final_sha256"] in stdout and str(out) in stdout and "macro_auc" in stdout
    assert "NOT comparable" in stdout


def test_two_runs_of_the_same_command_give_the_same_final_hash(two_runs):
    (a, _), (b, _) = two_runs
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert ra["final_sha256"] == rb["final_sha256"]
    assert ra["init_sha256"] == rb["init_sha256"]


def test_existing_run_directory_is_refused(two_runs, tmp_path):
    out, _ = two_runs[0]
    before = (out / "result.json").read_bytes()
    proc = _run(out)
    assert proc.returncode == 2
    assert "nothing was overwritten" in proc.stderr
    assert (out / "result.json").read_bytes() == before


def test_bad_data_dir_gives_a_clear_error(tmp_path):
    proc = run_experiment(SCRIPT, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "out", "--epochs", "1",
                          timeout=300)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr
