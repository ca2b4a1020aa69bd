"""Multi-process training for real: ``jax.distributed`` with 2 processes on localhost (CPU
collectives over gloo), 2 host devices each, one 4-device data-parallel mesh spanning both.

Each scenario starts two fresh interpreters (ranks 0 and 1) that share one run directory, as
hosts share a file system. Checked: the two processes agree, the manifest records processes
and devices, a run stopped after one epoch and resumed at the same topology (two more fresh
pairs) ends with the uninterrupted run's bits, which is also the run-to-run check, and a resume
on another topology (1 process x 4 devices) is refused.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"task": "synthetic",
          "data": {"n_train": 100, "n_val": 32, "n_test": 32, "length": 128, "leads": 12, "num_classes": 4, "seed": 3},
          "arch": "tiny", "init": "mixed", "epochs": 2, "batch_size": 16, "eval_every": 1}

pytestmark = pytest.mark.slow

WORKER = """
import json, sys
sys.path.insert(0, {repo!r})
rank, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import jax
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # before anything starts the backend (detjax's configure does)
    jax.distributed.initialize(coordinator_address=f"localhost:{{port}}", num_processes=nproc, process_id=rank)
from detjax.cli import configure_process
env = configure_process(1, {local_devices})
from detjax import tasks
from detjax.checkpoint import CheckpointMismatchError
from detjax.train import TrainConfig, train_and_evaluate
config = TrainConfig.from_dict({config!r})
data = tasks.load_task(config)
out = {{"rank": rank, "processes": jax.process_count(), "devices": len(jax.devices()),
        "local_devices": jax.local_device_count()}}
try:
    result = train_and_evaluate(config, data, {workdir!r}, environment=env, progress=False, devices={devices},
                                stop_after_epoch={stop})
    out["result"] = {{k: result.get(k) for k in ("final_sha256", "init_sha256", "stopped_after_epoch")}}
except CheckpointMismatchError as exc:
    out["refused"] = str(exc)
print(json.dumps(out), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp_path, workdir, *, processes=2, local_devices=2, stop=None) -> list[dict]:
    script = tmp_path / f"worker-{processes}x{local_devices}-{Path(workdir).name}-{stop}.py"
    script.write_text(WORKER.format(repo=str(REPO), config=CONFIG, workdir=str(workdir), stop=stop,
                                    local_devices=local_devices, devices=processes * local_devices))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(processes), port], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(processes)]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multihost") / "a"
    return workdir, _launch(workdir.parent, workdir)


def test_two_processes_two_devices_each_agree(uninterrupted):
    _, outs = uninterrupted
    finals = [o["result"]["final_sha256"] for o in outs]
    assert len(finals) == 2 and len(set(finals)) == 1  # both ranks
    assert [(o["processes"], o["devices"], o["local_devices"]) for o in outs] == [(2, 4, 2), (2, 4, 2)]


def test_manifest_records_processes_and_devices(uninterrupted):
    workdir, _ = uninterrupted
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["topology"] == {"processes": 2, "devices": 4, "devices_per_process": 2}
    assert manifest["mesh"]["devices"] == 4 and len(manifest["mesh"]["device_ids"]) == 4
    backend = manifest["environment"]["backend"]
    assert backend["process_count"] == 2 and backend["device_count"] == 4 and backend["local_device_count"] == 2


def test_resume_at_the_same_topology_continues_and_another_topology_is_refused(uninterrupted, tmp_path):
    reference = uninterrupted[1][0]["result"]["final_sha256"]
    work = tmp_path / "r"
    stopped = _launch(tmp_path, work, stop=0)
    assert all(o["result"]["stopped_after_epoch"] == 0 for o in stopped)
    # 1 process x 4 devices: the same device count, another topology
    before = (work / "manifest.json").read_bytes()
    refused = _launch(tmp_path, work, processes=1, local_devices=4)[0]
    assert "refused" in refused, refused
    assert "2 process(es) x 2 device(s)" in refused["refused"] and "1 x 4" in refused["refused"]
    assert (work / "manifest.json").read_bytes() == before  # a refusal changes nothing
    resumed = _launch(tmp_path, work)
    # other fresh processes, stopped and resumed: the uninterrupted run's bits (run to run too)
    assert [o["result"]["final_sha256"] for o in resumed] == [reference, reference]
