#!/usr/bin/env python
"""Runs the compiled train step of one model in a loop, for an external profiler.

Used for the profile in docs/RESULTS.md §3 (where the Conformer's step time goes)::

    STEPS=10 python benchmarks/profile_step.py conformer &     # writes its pid to /tmp/profile_step.pid when compiled
    perf record -F 499 -g -p $(cat /tmp/profile_step.pid) -o /tmp/perf.data -- sleep 15
    perf report -i /tmp/perf.data --no-children --sort dso --stdio -g none

Arguments: the model (conformer, baseline, resnet18) and optional extra XLA flags.
Batch 128, 2 threads, deterministic configuration, synthetic batch. It first prints where the
first step's time goes (``first step: trace … lower … compile … first run … s``, the HLO size;
no compilation cache), the profile behind the first-step row of docs/RESULTS.md §3::

    STEPS=0 python benchmarks/profile_step.py conformer

``DONATE=0`` jits the same step without donating the state (the donation lever). After the
timed steps (each waited for) the same number run back to back with one wait at the end: the
difference is the host time a prefetching loop could hide.

With ``JAX_COMPILATION_CACHE_DIR`` set, JAX's persistent compilation cache is used: the second
such run times a warm first step (the compile becomes a cache read).
"""
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detjax import determinism
determinism.configure(cpu_threads=2, extra_xla_flags=sys.argv[2:])
import jax, numpy as np, jax.numpy as jnp
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # set it to time a warm (cached) first step
    jax.config.update("jax_enable_compilation_cache", False)
from detjax.models import get_model
from detjax.train import TrainConfig, create_train_state, make_optimizer, make_gather_step, pos_weights
arch = sys.argv[1]
shape, classes, init, loss = ((1000, 12), 12, "mixed", "weighted_bce") if arch != "resnet18" else ((28, 28, 1), 2, "dct", "ce")
x = np.random.default_rng(0).standard_normal((256,) + shape).astype(np.float32)
if loss == "ce":
    y = np.random.default_rng(1).integers(0, 2, 256).astype(np.int32)  # class indices, as the CE loss takes them
else:
    y = (np.random.default_rng(1).random((256, classes)) < .2).astype(np.float32)
cfg = TrainConfig(task="ptbxl" if loss != "ce" else "medmnist", arch=arch, init=init, epochs=2, batch_size=128, loss=loss)
model = get_model(arch, num_classes=classes, init_mode=init, **({"in_channels": 1} if arch == "resnet18" else {}))
tx = make_optimizer(cfg, 2)
st = create_train_state(model, tx, x[:1], 0)
if os.environ.get("DONATE", "1") == "0":  # the same step without donating the state's buffers
    from detjax.train import gather_batch, make_step_fn
    step_fn = make_step_fn(model, tx, cfg, pos_weights(y) if loss != "ce" else None)
    step = jax.jit(lambda state, i, bx, by: step_fn(state, gather_batch(i, bx, by)))
else:
    step = make_gather_step(model, tx, cfg, pos_weights(y) if loss != "ce" else None)
xd, yd = jax.device_put(x), jax.device_put(y)
idx = jnp.arange(128, dtype=jnp.int32)
t0 = time.perf_counter(); traced = step.trace(st, idx, xd, yd)
t1 = time.perf_counter(); lowered = traced.lower()
t2 = time.perf_counter(); c = lowered.compile()
t3 = time.perf_counter(); st, m = c(st, idx, xd, yd); jax.block_until_ready(st)
t4 = time.perf_counter()
print(f"first step: trace {t1 - t0:.1f} lower {t2 - t1:.1f} compile {t3 - t2:.1f} first run {t4 - t3:.1f} s "
      f"(total {t4 - t0:.1f} s; {lowered.as_text().count(chr(10))} lines of StableHLO)", flush=True)
open("/tmp/profile_step.pid", "w").write(str(os.getpid()))
times = []
for i in range(int(os.environ.get("STEPS", "8"))):
    t = time.perf_counter()
    st, m = c(st, idx, xd, yd)
    jax.block_until_ready(st)
    times.append(time.perf_counter() - t)
if times:
    print(f"later steps: median {np.median(times):.2f} s ({128 / np.median(times):.1f} samples/s; "
          f"second step {times[0]:.2f} s)", flush=True)
    # the same number of steps dispatched back to back, one wait at the end
    t = time.perf_counter()
    for i in range(len(times)):
        st, m = c(st, idx, xd, yd)
    jax.block_until_ready(st)
    print(f"later steps without a wait between them: {(time.perf_counter() - t) / len(times):.2f} s per step",
          flush=True)
from detjax import hashing  # noqa: E402
print(f"state sha256 after {int(st.step)} steps: {hashing.tree_sha256(st)}", flush=True)
