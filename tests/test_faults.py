"""Faults: tampered and missing files, foreign checkpoints, kill -9 at named points, bad resumes.

What must hold (and does, for every case here):

* ``python -m detjax verify`` refuses a run whose stored files were altered (exit 3), naming
  the file, before it re-runs anything;
* ``--resume`` of a finished run changes nothing on disk; of a folder without a run it refuses;
* a corrupt checkpoint is refused on resume with one ``error:`` line naming the intact earlier
  checkpoint and how to continue from it; following that advice ends bit-identical;
* a run killed (SIGKILL, via the ``DETJAX_TEST_KILL_AT`` hook) during a step, during a
  checkpoint write or during the final record write, then resumed, ends bit-identical to an
  uninterrupted run, and its ``events.jsonl`` keeps the history;
* data loaded from a checksummed cache is checked like freshly read records.

Every run is the tiny model on the synthetic task, in a fresh process pinned to one CPU
thread (the session's shared compilation cache keeps the processes short).
"""

import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, detjax_cli, detjax_train, result_line

from detjax import manifest as manifest_lib

CONFIG = {"task": "synthetic",
          "data": {"n_train": 40, "n_val": 24, "n_test": 24, "length": 64, "leads": 3, "num_classes": 4, "seed": 1},
          "arch": "tiny", "init": "mixed", "epochs": 3, "batch_size": 16, "eval_every": 1}
STEPS_PER_EPOCH = 3  # ceil(40 / 16)


def _final_sha(proc) -> str:
    return result_line(proc)["final_sha256"]


def _assert_quiet_error(proc, code=2):
    """Exit ``code``, and stderr is ``error:`` lines (plus ``corrupt:`` detail) without tracebacks."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    for noise in ("Traceback", "Event loop is closed", "Exception ignored", "TensorStore"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.rglob("*")) if p.is_file()}


# config_path, reference_run and copy_of come from tests/conftest.py (this module's CONFIG).
@pytest.fixture(scope="module")
def reference(reference_run):
    """The uninterrupted reference run as ``(run_dir, final_sha256)``."""
    run_dir, result = reference_run
    return run_dir, result["final_sha256"]


# ----------------------------------------------------------------- records and resume


def test_records_are_created_with_the_umask_and_keep_their_history(reference):
    run_dir, final = reference
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("manifest.json", "result.json", "events.jsonl"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~umask, name
    events = manifest_lib.read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [1, 2, 3]
    assert events[-1]["final_sha256"] == final and all("utc" in e for e in events)
    # The manifest was rewritten once (running -> finished); the running version is kept.
    superseded = [e for e in events if e["event"] == "superseded"]
    assert [e["file"] for e in superseded] == ["manifest.json"]
    assert superseded[0]["content"]["status"] == "running"


def test_resume_of_a_finished_run_changes_nothing(reference, config_path):
    run_dir, final = reference
    before = _snapshot(run_dir)
    proc = detjax_train(config_path, run_dir, "--resume")
    assert _final_sha(proc) == final
    assert "already complete" in proc.stdout and "nothing was changed" in proc.stdout
    assert _snapshot(run_dir) == before  # same bytes, same mtimes, same modes


def test_resume_of_a_folder_without_a_run_is_refused(config_path, tmp_path, capsys):
    from detjax.__main__ import main

    missing, empty = tmp_path / "misspelt", tmp_path / "empty"
    empty.mkdir()
    for folder in (missing, empty):
        assert main(["run", str(config_path), "--out", str(folder), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --resume:") and "leave out --resume" in err, err
    assert not missing.exists() and not any(empty.iterdir())


# --------------------------------------------------------------- verify: stored files


def _flip(path: Path, offset: int | None = None, *, text: str | None = None) -> None:
    """Flips one byte of ``path``: at ``offset`` (default the middle), or inside ``text``."""
    raw = bytearray(path.read_bytes())
    if text is not None:
        offset = raw.index(text.encode()) + len(text) // 2
    offset = len(raw) // 2 if offset is None else offset
    raw[offset] ^= 0x01 if text is not None else 0xFF
    path.write_bytes(bytes(raw))


def _chunks(item_dir: Path) -> list[Path]:
    """Every data file of an orbax item. Damage goes to all of them: how orbax spreads the arrays
    over its files varies between saves, and bytes no array refers to may be damaged harmlessly
    (the restored arrays are what is checked). In the full suite a flip of only the largest
    file once went unnoticed, the restored state hashing to the recorded digest."""
    return sorted((item_dir / "ocdbt.process_0" / "d").iterdir())


def _flip_chunks(item_dir: Path) -> None:
    for chunk in _chunks(item_dir):
        _flip(chunk)


def _truncate_chunks(item_dir: Path) -> None:
    for chunk in _chunks(item_dir):
        chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])


def _stored_problems(run_dir: Path) -> str:
    from detjax.__main__ import StoredFilesError, check_stored_files

    with pytest.raises(StoredFilesError) as info:
        check_stored_files(run_dir, manifest_lib.read_manifest(run_dir))
    return " | ".join(info.value.problems)


def test_stored_files_of_the_reference_are_intact(reference):
    from detjax import hashing
    from detjax.__main__ import check_stored_files

    run_dir, final = reference
    _, state = check_stored_files(run_dir, manifest_lib.read_manifest(run_dir))
    assert hashing.tree_sha256(state) == final


def test_a_flipped_byte_in_each_kind_of_stored_file_is_named(reference, copy_of):
    run_dir, final = reference
    manifest = json.loads((run_dir / "manifest.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    cases = {  # file to damage -> how, and the name the report must contain
        "state chunk": (lambda d: _flip_chunks(d / "checkpoints/3/state"), "checkpoints/3/state"),
        "best chunk": (lambda d: _flip_chunks(d / "checkpoints/3/best"), "checkpoints/3/best"),
        "sidecar": (lambda d: _flip(d / "checkpoints/3/detjax/metadata", text=final), "checkpoints/3/detjax"),
        "manifest": (lambda d: _flip(d / "manifest.json", text=manifest["final_digests"]["sha256"]),
                     "manifest.json"),
        "result": (lambda d: _flip(d / "result.json", text=result["best_params_sha256"]), "result.json"),
        "events": (lambda d: _flip(d / "events.jsonl", text=f'"final_sha256": "{final}'), "events.jsonl"),
        "orbax metadata": (lambda d: _flip(d / "checkpoints/3/state/_METADATA", text='"params"'),
                           "checkpoints/3"),
    }
    for kind, (damage, name) in cases.items():
        broken = copy_of(kind.replace(" ", "-"))
        damage(broken)
        report = _stored_problems(broken)
        assert name in report, (kind, report)


def test_a_deleted_sidecar_a_truncated_chunk_and_a_foreign_checkpoint_are_named(reference, copy_of):
    from detjax.checkpoint import Checkpointer

    broken = copy_of("no-sidecar")
    (broken / "checkpoints/3/detjax/metadata").unlink()
    assert "checkpoints/3/detjax" in _stored_problems(broken)

    broken = copy_of("truncated")
    _truncate_chunks(broken / "checkpoints/3/state")
    report = _stored_problems(broken)
    assert "checkpoints/3" in report and "TensorStore" not in report and "\n" not in report

    # A foreign checkpoint: valid orbax files written under another config hash.
    from detjax.train import TrainConfig, restore_targets

    broken = copy_of("foreign")
    manifest = manifest_lib.read_manifest(broken)
    _, state, best = restore_targets(manifest, TrainConfig.from_dict(manifest["config"]))
    shutil.rmtree(broken / "checkpoints/3")
    with Checkpointer(broken / "checkpoints", config_hash="f" * 64) as ckpt:
        ckpt.save(3, state, best, {"history": []})
    report = _stored_problems(broken)
    assert "checkpoints/3" in report and "config hash" in report


def test_verify_exits_3_on_corrupt_files_without_re_running(reference, copy_of):
    broken = copy_of("verify-corrupt")
    _flip_chunks(broken / "checkpoints/3/best")
    proc = detjax_cli("verify", broken)
    line = _assert_quiet_error(proc, code=3)
    assert "stored files corrupt" in line and "re-running" not in proc.stdout
    assert "checkpoints/3/best" in proc.stderr


def test_verify_of_a_truncated_chunk_is_one_line_and_nothing_follows(reference, copy_of):
    # A failed orbax read leaves coroutines whose errors Python would print at exit, in full.
    broken = copy_of("verify-truncated")
    _truncate_chunks(broken / "checkpoints/3/state")
    proc = detjax_cli("verify", broken)
    line = _assert_quiet_error(proc, code=3)
    assert "stored files corrupt" in line and "checkpoints/3" in proc.stderr


def test_verify_exits_1_when_the_re_run_differs(reference, monkeypatch, capsys):
    """The comparison path, with the fresh process replaced by one that reports other bits."""
    import jax

    import detjax.__main__ as cli_main

    run_dir, final = reference
    other = "0" * 64

    def fake_run(cmd, **kwargs):
        if cmd[3] == "env":
            return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(manifest_lib.read_manifest(run_dir)
                                                                         ["environment"]))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"final_sha256": other}) + "\n")

    stored = {}

    def fake_rerun_state(out):
        state = jax.tree_util.tree_map(np.array, stored["state"])
        state["step"] = np.asarray(state["step"]) + 1
        return state

    original = cli_main.check_stored_files

    def keep_state(*a):
        config, state = original(*a)
        stored["state"] = state
        return config, state

    monkeypatch.setattr(cli_main, "check_stored_files", keep_state)
    monkeypatch.setattr(cli_main, "_rerun_final_state", fake_rerun_state)
    monkeypatch.setattr(cli_main.subprocess, "run", fake_run)
    assert cli_main.main(["verify", str(run_dir), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("DIFFERENT: first differing leaf") and "step" in out


# ------------------------------------------------------------ corrupt checkpoint on resume


def test_a_corrupt_checkpoint_names_the_intact_one_and_the_advice_works(reference, copy_of, config_path):
    run_dir, final = reference
    broken = copy_of("resume-corrupt")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["status"] = "running"  # as if it had been killed after its last checkpoint
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "result.json").unlink()
    _truncate_chunks(broken / "checkpoints/3/state")  # truncated chunks
    before = _snapshot(broken)
    proc = detjax_train(config_path, broken, "--resume")
    line = _assert_quiet_error(proc)
    assert str(broken / "checkpoints" / "3") in line and str(broken / "checkpoints" / "2") in line, line
    assert "is intact" in line and "mv " in line and "--resume" in line, line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # nothing follows the message
    assert _snapshot(broken) == before  # a refusal changes nothing
    # Follow the advice: move the corrupt checkpoint aside and resume.
    shutil.move(broken / "checkpoints" / "3", broken / "corrupt-checkpoint-3")
    assert _final_sha(detjax_train(config_path, broken, "--resume")) == final


# ------------------------------------------------------------------- kill -9 and resume


@pytest.mark.parametrize("point", [f"step:{STEPS_PER_EPOCH + 2}", "checkpoint:2", "final-record"])
def test_kill_9_then_resume_is_bit_identical(point, reference, config_path, tmp_path):
    _, final = reference
    out = tmp_path / "killed"
    killed = detjax_train(config_path, out, env=cli_env(DETJAX_TEST_KILL_AT=point))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    if point.startswith("step"):  # killed in epoch 1: only epoch 0's checkpoint exists
        assert steps == [1]
    elif point.startswith("checkpoint"):  # checkpoint 2 written but never committed
        assert steps == [1] and any(".orbax-checkpoint-tmp" in p.name for p in (out / "checkpoints").iterdir())
    else:  # result.json written, manifest.json not yet finished
        assert steps == [2, 3] and (out / "result.json").exists()
    resumed = detjax_train(config_path, out, "--resume")
    assert _final_sha(resumed) == final
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    events = [e["event"] for e in manifest_lib.read_events(out)]
    assert events[0] == "started" and "resumed" in events and events[-1] == "finished"
    if point == "final-record":  # the first result.json is kept in the history
        assert any(e["event"] == "superseded" and e["file"] == "result.json" for e in manifest_lib.read_events(out))


# --------------------------------------------------------------------- data caches


def test_non_finite_values_in_a_checksummed_ptbxl_cache_name_the_record(tmp_path):
    from detjax.data import cache, ptbxl

    data = ptbxl.load_ptbxl(cache_dir=tmp_path)
    path = Path(data.source["cache_file"])
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    key = str(arrays.pop("key"))
    arrays.pop("digest")
    arrays["x"] = arrays["x"].copy()
    arrays["x"][7, 10, 2] = np.nan
    cache.write_cache(path, key, arrays, cache.fingerprint(arrays))  # a valid digest over the NaN
    with pytest.raises(ValueError, match=r"record ecg_id=8 holds 1 non-finite"):
        ptbxl.load_ptbxl(cache_dir=tmp_path)
    arrays["x"] = arrays["x"][:, :500]  # the wrong shape, also checksummed
    cache.write_cache(path, key, arrays, cache.fingerprint(arrays))
    with pytest.raises(ValueError, match=r"shape \(500, 500, 12\)"):
        ptbxl.load_ptbxl(cache_dir=tmp_path)


def test_non_finite_values_in_a_checksummed_cinc2017_cache_name_the_record(tmp_path):
    from test_data_cinc2017 import make_tree

    from detjax.data import cache
    from detjax.data import cinc2017 as C

    root = make_tree(tmp_path / "training2017")
    folds = tmp_path / "folds.csv"
    C.load_cinc2017(root, folds=folds, cache_dir=tmp_path / "cache")
    path = next((tmp_path / "cache" / "cinc2017").glob("*.npz"))
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    key = str(arrays.pop("key"))
    arrays.pop("digest")
    arrays["x"] = arrays["x"].copy()
    arrays["x"][4, 3] = np.inf
    name = str(arrays["record"][4])
    cache.write_cache(path, key, arrays, cache.fingerprint(arrays))
    with pytest.raises(ValueError, match=f"record {name} holds 1 non-finite"):
        C.load_cinc2017(root, folds=folds, cache_dir=tmp_path / "cache")
