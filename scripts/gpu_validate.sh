#!/usr/bin/env bash
# The whole GPU proof in one call, for a machine with jax (CUDA) preinstalled and no network.
#
#   OUT=gpu-out bash scripts/gpu_validate.sh                 # from the repository root; budget 420 s
#   GPU_VALIDATE_BUDGET=600 OUT=gpu-out bash scripts/gpu_validate.sh
#   DETJAX_GPU_DRYRUN=1 OUT=/tmp/dry bash scripts/gpu_validate.sh   # same steps, tiny settings, CPU
#
# Nothing is installed from a network: the repository runs from its checkout (PYTHONPATH=.), and
# only wheels found in ./.whl/ (wfdb and the pure-python/manylinux packages detjax needs that the
# machine may lack) are installed, with `pip install --no-index --no-deps --target` into a
# temporary directory, and only those whose distribution is not installed already.
#
# Every step runs under `timeout` within the remaining total budget (the budget left is passed
# down as DETJAX_STEP_BUDGET_S); its output goes to $OUT/<step>.log. A failing step is recorded
# and the script goes on. $OUT/summary.json gathers the steps and their results, and the last
# line printed is `VERDICT: ...`.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_VALIDATE_BUDGET:-420}
DRY=${DETJAX_GPU_DRYRUN:-0}
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the interpreter that has jax
  for c in python3 python; do
    if command -v "$c" > /dev/null && "$c" -c 'import jax' 2> /dev/null; then PY=$c; break; fi
  done
  PY=${PY:-python3}
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/detjax-gpu-validate.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export DETJAX_CACHE_DIR="$WORK/cache"       # fresh flag-probe and data caches
export MPLBACKEND=Agg
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes may share the GPU
unset XLA_FLAGS JAX_COMPILATION_CACHE_DIR
for v in $(env | grep -o '^JAX_PERSISTENT_CACHE_[A-Z_]*'); do unset "$v"; done
export JAX_ENABLE_COMPILATION_CACHE=false  # every step compiles afresh
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  REQUIRE=any
  # tiny settings: the same steps, a few seconds each on a CPU
  CHECK_ARCHS="tiny"; CHECK_ARGS="--steps 2 --batch-size 8 --length 128 --cpu-threads 1 --canary-size 65536 --canary-repeats 3 --runs 2 --control-runs 1"
  CANARY_ARGS="--repeats 3 --size 65536"
  PTB_ARGS="--arch baseline --epochs 2 --limit 16 --batch-size 16 --eval-every 1 --cpu-threads 1 --no-progress"
  KILL_AT=1   # kill -9 once this checkpoint (epochs done) exists, then resume
  RUN_B=0     # no second uninterrupted PTB-XL run
  BENCH_MODELS="baseline"; BENCH_BATCH=4; BENCH_STEPS=2
  VMAP_ARGS="--arch tiny --k 2 --modes vmap --rounds 1 --batch 8 --length 128 --cpu-threads 1"
  # CPU only: the PTB-XL runs, benchmark and vmap steps share a compile cache so the dry run stays
  # short (gpu-check workers still drop it). A real run keeps every cache off.
  DRY_CACHE="$WORK/xla-cache"
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}   # no silent CPU fallback
  REQUIRE=gpu
  CHECK_ARCHS="conformer baseline"; CHECK_ARGS="--steps 10 --batch-size 64 --runs 3 --control-runs 2"
  CANARY_ARGS="--repeats 10 --size 4194304"
  PTB_ARGS="--arch conformer --epochs 4 --eval-every 2 --no-progress"
  KILL_AT=2
  RUN_B=1
  BENCH_MODELS="conformer baseline resnet18"; BENCH_BATCH=128; BENCH_STEPS=10
  VMAP_ARGS="--arch conformer --k 2 4 --modes vmap unroll --rounds 2 --batch 128"
fi
STEPS_TSV="$OUT/steps.tsv"
: > "$STEPS_TSV"
echo "detjax gpu_validate: OUT=$OUT budget=${BUDGET}s dryrun=$DRY python=$PY"

# run_step NAME SHARE_OF_BUDGET_PERCENT CMD...: run CMD under timeout (its share of the total
# budget, but never past the deadline), log to $OUT/NAME.log, record rc and seconds.
run_step() {
  local name=$1 share=$2; shift 2
  local now remaining limit rc t0 t1 status
  now=$(date +%s); remaining=$((DEADLINE - now))
  limit=$((BUDGET * share / 100)); [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$limit" -lt 5 ]; then
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" "" "0" >> "$STEPS_TSV"
    echo "[$name] skipped: budget spent"; return 0
  fi
  echo "[$name] up to ${limit}s ..."
  t0=$(date +%s)
  DETJAX_STEP_BUDGET_S=$limit timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((t1 - t0))" >> "$STEPS_TSV"
  echo "[$name] $status (rc $rc, $((t1 - t0)) s)"
  return 0
}

# --- 0. wheels from .whl/ (only distributions that are missing) ------------------------------
step_wheels() {
  local lib="$WORK/pylib"
  mkdir -p "$lib"
  "$PY" - "$REPO/.whl" "$lib" <<'EOF'
import importlib.metadata as md, pathlib, re, subprocess, sys, zipfile
whl, lib = pathlib.Path(sys.argv[1]), sys.argv[2]
wheels = sorted(whl.glob("*.whl")) if whl.is_dir() else []
if not wheels:
    print(f"no wheels in {whl}: nothing to install (the PTB-XL step needs wfdb on a cache miss)")
missing = []
for w in wheels:
    dist = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    try:
        print(f"{dist}: installed {md.version(dist)}, wheel {w.name} not used")
    except md.PackageNotFoundError:
        missing.append(w)
if missing:
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", lib, *map(str, missing)]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("pip failed; unpacking the pure-python wheels instead (binary ones need a matching pip install)")
        for w in missing:
            if w.name.endswith("-none-any.whl"):
                zipfile.ZipFile(w).extractall(lib)
                print(f"unpacked from .whl: {w.name}")
    else:
        for w in missing:
            print(f"installed from .whl: {w.name}")
EOF
}
run_step wheels 5 bash -c "$(declare -f step_wheels); WORK='$WORK' REPO='$REPO' PY='$PY' step_wheels"
export PYTHONPATH="$REPO:$WORK/pylib${PYTHONPATH#"$REPO"}"

# --- 1. versions and nvidia-smi -------------------------------------------------------------------
run_step versions 6 bash -c "
  '$PY' -c 'import sys, jax, jaxlib; print(sys.version); print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__); print(jax.devices())';
  '$PY' -m pip list 2>/dev/null | grep -iE '^(jax|flax|optax|orbax|numpy|scipy|nvidia|wfdb|pandas|scikit)' ;
  '$PY' -m detjax env > '$OUT/fingerprint.json' && echo 'fingerprint: $OUT/fingerprint.json'"
if command -v nvidia-smi > /dev/null; then
  run_step nvidia-smi 3 bash -c "nvidia-smi; nvidia-smi -q | head -200; nvidia-smi topo -m"
else
  printf '%s\t%s\t%s\t%s\n' nvidia-smi "absent" "" 0 >> "$STEPS_TSV"; echo "[nvidia-smi] not on PATH"
fi

# --- 2. XLA flag probe ----------------------------------------------------------------------------
run_step flag-probe 5 "$PY" -c "
import json
from detjax import determinism as d
flags = list(d.DETERMINISTIC_XLA_FLAGS) + ['--xla_gpu_enable_cublaslt=false', '--xla_this_flag_does_not_exist=true']
res = d.probe_xla_flags(flags)
for f, p in res.items():
    print(f'{\"accepted\" if p.accepted else \"REJECTED\"}  {f}  ({p.detail})')
json.dump({f: p._asdict() for f, p in res.items()}, open('$OUT/flag-probe.json', 'w'), indent=1)
assert any(res[f].accepted for f in d.FAIL_CLOSED_GPU_FLAGS), 'no fail-closed GPU flag is accepted'
"

# --- 3. the canary: colliding scatter-add, deterministic flags vs XLA defaults --------------------
run_step canary 6 bash -c "
  '$PY' -m detjax.ci canary --deterministic 1 $CANARY_ARGS --report '$OUT/canary-deterministic.json' &&
  '$PY' -m detjax.ci canary --deterministic 0 $CANARY_ARGS --report '$OUT/canary-default.json'"

# --- 4. gpu-check: fresh processes, no compile cache, canary, control -------------------------------
for arch in $CHECK_ARCHS; do
  share=25; [ "$arch" = baseline ] && share=15
  run_step "gpu-check-$arch" $share "$PY" -m detjax.ci gpu-check --arch "$arch" $CHECK_ARGS \
    --require-platform $REQUIRE --report "$OUT/gpu-check-$arch.json"
done

# --- 5. PTB-XL sample: two trainings and a kill -9 / resume, final hashes compared -------------------
step_ptbxl() {
  local runs="$WORK/ptbxl" pid
  mkdir -p "$runs"
  "$PY" experiments/ptbxl.py $PTB_ARGS --out "$runs/a" || return 1
  # b: a second uninterrupted run, so that a c that differs says whether resume or the runs
  # broke; the dry run leaves it out (c equal to a shows both, and the dry run must stay short)
  if [ "$RUN_B" = 1 ]; then "$PY" experiments/ptbxl.py $PTB_ARGS --out "$runs/b" || return 1; fi
  "$PY" experiments/ptbxl.py $PTB_ARGS --out "$runs/c" & pid=$!
  while kill -0 "$pid" 2> /dev/null && [ ! -d "$runs/c/checkpoints/$KILL_AT" ]; do sleep 0.05; done
  if kill -9 "$pid" 2> /dev/null; then echo "KILLED -9 after checkpoint $KILL_AT"; touch "$runs/killed"; else echo "NOT KILLED: run c ended first"; fi
  wait "$pid" 2> /dev/null
  test -e "$runs/c/result.json" && echo "run c had finished before the kill"
  "$PY" experiments/ptbxl.py $PTB_ARGS --out "$runs/c" --resume || return 1
  "$PY" - "$runs" "$OUT/ptbxl.json" <<'EOF'
import json, sys, pathlib
runs, out = pathlib.Path(sys.argv[1]), sys.argv[2]
res = {k: json.loads((runs / k / "result.json").read_text()) for k in "abc" if (runs / k).exists()}
man = json.loads((runs / "c" / "manifest.json").read_text())
rec = {k: {"final_sha256": r["final_sha256"], "init_sha256": r["init_sha256"], "macro_auc": r.get("macro_auc"),
           "wall_time_s": r["wall_time_s"]} for k, r in res.items()}
rec["resumed_from_step"] = [x["step"] for x in man.get("resumed_from", [])]
rec["killed"] = (runs / "killed").exists()
rec["identical"] = len({r["final_sha256"] for r in res.values()}) == 1
rec["platform"] = man["environment"]["backend"]["platform"]
json.dump(rec, open(out, "w"), indent=1)
print(json.dumps(rec, indent=1))
sys.exit(0 if rec["identical"] and rec["resumed_from_step"] and rec["killed"] else 1)
EOF
}
if [ "$DRY" = 1 ]; then
  export JAX_ENABLE_COMPILATION_CACHE=true JAX_COMPILATION_CACHE_DIR="$DRY_CACHE"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
fi
run_step ptbxl 20 bash -c "$(declare -f step_ptbxl); WORK='$WORK' OUT='$OUT' PY='$PY' PTB_ARGS='$PTB_ARGS' KILL_AT=$KILL_AT RUN_B=$RUN_B step_ptbxl"

# --- 6. train-step benchmark: deterministic vs default flags --------------------------------------
run_step bench-train-step 12 "$PY" - <<EOF
import json, sys
sys.path.insert(0, "benchmarks")
import bench_train_step as b
rows = []
TRAIN, EPOCHS = 17418, 85  # PTB-XL folds 1-8 (the paper's training set) and its epochs
for arch in "$BENCH_MODELS".split():
    default = b.measure(arch, False, $BENCH_BATCH, $BENCH_STEPS)
    det = b.measure(arch, True, $BENCH_BATCH, $BENCH_STEPS)
    peak = b.FP32_PEAK_TFLOPS.get(det["device_kind"])
    achieved = det["flops_per_step"] / det["median_step_s"] / 1e12
    steps_85 = EPOCHS * -(-TRAIN // $BENCH_BATCH)
    row = {"model": arch, "device_kind": det["device_kind"], "batch": $BENCH_BATCH,
           "default_s_per_step": default["median_step_s"], "deterministic_s_per_step": det["median_step_s"],
           "deterministic_over_default": det["median_step_s"] / default["median_step_s"],
           "deterministic_samples_per_s": det["samples_per_s"], "default_samples_per_s": default["samples_per_s"],
           "gflop_per_step": det["flops_per_step"] / 1e9, "achieved_tflops": achieved,
           "pct_fp32_peak": 100 * achieved / peak if peak else None,
           "first_step_s_deterministic": det["first_step_s"]}
    if arch != "resnet18":
        row["ptbxl_85_epochs_extrapolated_s"] = steps_85 * det["median_step_s"]
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open("$OUT/bench-train-step.json", "w"), indent=1)
EOF

# --- 7. k seeds in one program (vmap / unroll / map) vs solo, bit for bit -------------------------
run_step vmap-vs-solo 8 "$PY" benchmarks/bench_vmap_seeds.py $VMAP_ARGS --json "$OUT/vmap-vs-solo.json"

# --- summary and verdict --------------------------------------------------------------------------
"$PY" - "$OUT" "$DRY" "$BUDGET" "$START" <<'EOF'
import json, sys, time, pathlib
out, dry, budget, start = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds = line.split("\t")
    steps.append({"step": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(seconds),
                  "log": f"{name}.log"})

def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None

checks = {p.stem.replace("gpu-check-", ""): load(p.name) for p in sorted(out.glob("gpu-check-*.json"))}
fp = load("fingerprint.json") or {}
summary = {
    "dry_run": dry, "budget_s": budget, "elapsed_s": int(time.time()) - start,
    "platform": (fp.get("backend") or {}).get("platform"),
    "device_kinds": (fp.get("backend") or {}).get("device_kinds"),
    "versions": {**(fp.get("packages") or {}), "python": (fp.get("python") or {}).get("version")},
    "gpu_packages": fp.get("gpu_packages"),
    "steps": steps,
    "flag_probe": load("flag-probe.json"),
    "canary": {"deterministic": load("canary-deterministic.json"), "default": load("canary-default.json")},
    "gpu_check": {a: None if r is None else {k: r.get(k) for k in (
        "partial", "passed", "identical", "platform", "compile_cache", "canary", "canary_identical",
        "control_differs", "control_verdict", "hashes") if k in r} for a, r in checks.items()},
    "ptbxl": load("ptbxl.json"),
    "bench_train_step": load("bench-train-step.json"),
    "vmap_vs_solo": load("vmap-vs-solo.json"),
}
vm = summary["vmap_vs_solo"]
if vm:
    vm.pop("environment", None)
problems = [f"{s['step']} {s['status']}" for s in steps if s["status"] not in ("ok", "absent")]
ok_checks = [a for a, r in checks.items() if r and r.get("passed")]
ptb = summary["ptbxl"] or {}
proven = bool(checks) and len(ok_checks) == len(checks) and ptb.get("identical") is True and ptb.get("killed") is True
if dry:
    head = "DRY RUN on " + str(summary["platform"]) + " (not a GPU proof): "
elif summary["platform"] not in ("gpu", "cuda", "rocm"):
    head = f"FAIL: the backend is {summary['platform']!r}, not a GPU: "
else:
    head = ("PASS: " if proven and not problems else "FAIL: " if not proven else "PARTIAL: ")
parts = [f"gpu-check {'/'.join(ok_checks) or 'none'} passed of {'/'.join(checks) or 'none'}",
         f"PTB-XL runs + kill/resume {'identical' if ptb.get('identical') and ptb.get('killed') else 'NOT shown identical'}"]
cd = [r.get("control_verdict", "") for r in checks.values() if r]
if cd:
    parts.append("control: " + ("differs" if any(v.startswith("control differs") for v in cd) else "no demonstrated power"))
if problems:
    parts.append("steps not ok: " + ", ".join(problems))
summary["verdict"] = head + "; ".join(parts)
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"summary: {out / 'summary.json'}")
print("VERDICT: " + summary["verdict"])
EOF
