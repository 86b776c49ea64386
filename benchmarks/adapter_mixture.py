"""Benchmark: the Pallas adapter-mixture kernel against plain-JAX (XLA) paths.

Paths (all compute y = scale * sum_e g[t,e] (x @ A[e]) @ B[e] with float32 rank intermediates):
  pallas      drex.kernels.adapter_mixture (default tiles for the backend)
  xla_dense   drex.adapters.mixture.mixture_reference (two einsums over all experts)
  xla_ragged  tokens sorted by expert (top-k of the gates), jax.lax.ragged_dot down and up,
              scatter-add back
  xla_loop    per-expert loop of dense matmuls, gate-scaled, summed
  xla_dense_lowp  (bf16 only, informational) like xla_dense but the rank intermediate is
              rounded to bf16 before the up projection: does NOT keep the fp32-intermediate
              contract, so it is never counted as "best XLA"
Extra sections: `mixed_linear` (fused base matmul) vs XLA `x @ W + b + mixture`, and
`per_sequence_lora` vs an XLA gather + einsum.

Timing: every measured call runs inside one jitted program that calls the path `n_iter` times,
each call on its own input set (distinct arrays: nothing is cached in L2 across calls and XLA
cannot merge identical calls); the program runs after two warm-ups, `reps` times,
each ended by block_until_ready; the median wall time / n_iter is reported. Executables are
compiled ahead of time in parallel threads.

Roofline: bytes = x + y + gates + A, B of the experts actually routed to (each read once) and
useful FLOPs = 2 * T * k * r * (d_in + d_out). Assumed H100 SXM peaks: 3.35 TB/s HBM3,
989 TFLOP/s dense bf16, 494 TFLOP/s dense TF32 (datasheet); the run also measures a device copy.

  PYTHONPATH=. python3 benchmarks/adapter_mixture.py --quick --out benchmarks/results
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from drex import kernels
from drex.adapters.mixture import mixture_reference

F32 = jnp.float32
PEAK_HBM_TBS = 3.35
PEAK_BF16_TFLOPS = 989.0
PEAK_TF32_TFLOPS = 494.0
L2_BYTES = 50 * 2**20

# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------


def path_pallas(x, a, b, g, scale, k, tiles=None):
  del k
  return kernels.adapter_mixture(x, a, b, g, scale, tiles=tiles)


def path_dense(x, a, b, g, scale, k):
  del k
  return mixture_reference(x, a, b, g, scale)


def path_dense_lowp(x, a, b, g, scale, k):
  del k
  z = jnp.einsum("td,edr->ter", x, a, preferred_element_type=F32)
  z = (z * (g.astype(F32) * scale)[..., None]).astype(x.dtype)
  return jnp.einsum("ter,ero->to", z, b, preferred_element_type=F32).astype(x.dtype)


def path_ragged(x, a, b, g, scale, k):
  T = x.shape[0]
  E, _, _ = a.shape
  d_out = b.shape[-1]
  vals, idx = jax.lax.top_k(g, k)
  flat_e = idx.reshape(-1)
  order = jnp.argsort(flat_e, stable=True)
  tok = order // k
  xs = jnp.take(x, tok, axis=0)
  sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
  h = jax.lax.ragged_dot(xs, a, sizes, preferred_element_type=F32)
  h = h * (jnp.take(vals.reshape(-1), order).astype(F32) * scale)[:, None]
  ys = jax.lax.ragged_dot(h, b.astype(F32), sizes, preferred_element_type=F32)
  return jnp.zeros((T, d_out), F32).at[tok].add(ys).astype(x.dtype)


def path_loop(x, a, b, g, scale, k):
  del k
  y = jnp.zeros((x.shape[0], b.shape[-1]), F32)
  for e in range(a.shape[0]):
    z = jnp.dot(x, a[e], preferred_element_type=F32) * (g[:, e:e + 1].astype(F32) * scale)
    y = y + jnp.dot(z, b[e].astype(F32), preferred_element_type=F32)
  return y.astype(x.dtype)


MIX_PATHS = {"pallas": path_pallas, "xla_dense": path_dense, "xla_ragged": path_ragged,
             "xla_loop": path_loop, "xla_dense_lowp": path_dense_lowp}
XLA_CONTRACT_PATHS = ("xla_dense", "xla_ragged", "xla_loop")


def fused_pallas(x, w, bias, a, b, g, scale, k):
  del k
  return kernels.mixed_linear(x, w, bias, a, b, g, scale)


def fused_xla(x, w, bias, a, b, g, scale, k):
  del k
  base = jnp.dot(x, w, preferred_element_type=F32) + bias.astype(F32)
  return (base + mixture_reference(x, a, b, g, scale).astype(F32)).astype(x.dtype)


def perseq_pallas(x, a, b, idx, scale):
  return kernels.per_sequence_lora(x, a, b, idx, scale)


def perseq_xla(x, a, b, idx, scale):
  ae, be = jnp.take(a, idx, axis=0), jnp.take(b, idx, axis=0)
  z = jnp.einsum("sld,sdr->slr", x, ae, preferred_element_type=F32) * scale
  return jnp.einsum("slr,sro->slo", z, be.astype(F32)).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Grid
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str       # 'mixture' | 'fused' | 'perseq'
  cls: str        # 'prefill' | 'decode'
  T: int          # tokens (perseq: B * L)
  d: int          # d_in = d_out
  r: int
  E: int
  k: int          # experts per token (k == E: dense gates)
  dtype: str
  L: int = 0      # perseq: sequence length

  @property
  def name(self):
    extra = f"_L{self.L}" if self.kind == "perseq" else ""
    return f"{self.kind}_{self.cls}_T{self.T}_d{self.d}_r{self.r}_E{self.E}_k{self.k}_{self.dtype}{extra}"


def quick_grid():
  m = []
  for T, d, r, E, k, dt in [(8192, 4096, 16, 8, 2, "bf16"), (8192, 4096, 64, 32, 2, "bf16"),
                            (8192, 4096, 8, 2, 1, "bf16"), (16384, 2048, 16, 8, 2, "bf16"),
                            (8192, 4096, 16, 8, 8, "bf16"), (4096, 4096, 16, 8, 2, "f32")]:
    m.append(Case("mixture", "prefill", T, d, r, E, k, dt))
  for T, d, r, E, k, dt in [(1, 4096, 64, 32, 2, "bf16"), (16, 4096, 64, 32, 2, "bf16"),
                            (64, 4096, 64, 32, 2, "bf16"), (64, 4096, 16, 8, 2, "bf16"),
                            (1, 2048, 16, 8, 1, "bf16"), (8, 4096, 16, 16, 16, "bf16"),
                            (16, 4096, 64, 32, 2, "f32")]:
    m.append(Case("mixture", "decode", T, d, r, E, k, dt))
  m.append(Case("fused", "prefill", 8192, 4096, 16, 8, 2, "bf16"))
  m.append(Case("fused", "decode", 16, 4096, 64, 32, 2, "bf16"))
  m.append(Case("perseq", "prefill", 8 * 1024, 4096, 16, 8, 1, "bf16", L=1024))
  m.append(Case("perseq", "decode", 32, 4096, 16, 8, 1, "bf16", L=1))
  return m


def smoke_grid():
  """Tiny shapes to check the script itself (e.g. on CPU, where Pallas runs interpreted)."""
  return [Case("mixture", "prefill", 64, 128, 8, 4, 2, "f32"),
          Case("mixture", "decode", 3, 128, 16, 4, 1, "bf16"),
          Case("fused", "decode", 5, 64, 8, 2, 1, "f32"),
          Case("perseq", "decode", 4, 64, 8, 3, 1, "f32", L=2)]


def full_grid():
  m = []
  for T in (1, 16, 64, 4096, 16384):
    cls = "decode" if T <= 64 else "prefill"
    for d in (2048, 4096):
      for r in (8, 16, 64):
        for E in (2, 8, 32):
          for k in sorted({1, 2} & set(range(1, E + 1))):
            for dt in ("bf16", "f32"):
              m.append(Case("mixture", cls, T, d, r, E, k, dt))
  return m + [c for c in quick_grid() if c.kind != "mixture"]


TUNE = {  # alternative tiles tried with --tune on TUNED_CASES (besides the defaults)
    "prefill": [dict(num_warps=8), dict(block_n=256, num_warps=8),
                dict(block_t=128, num_warps=8)],
    "decode": [dict(k_splits=8, experts_per_up=1), dict(k_splits=2, experts_per_up=4),
               dict(block_n=64)],
}

# ------------------------------------------------------------------------------------------------
# Inputs, roofline
# ------------------------------------------------------------------------------------------------


def _dtype(name):
  return {"bf16": jnp.bfloat16, "f32": jnp.float32}[name]


def make_gates(key, T, E, k):
  logits = jax.random.normal(key, (T, E), F32)
  if k >= E:
    return jax.nn.softmax(logits, axis=-1)
  vals, idx = jax.lax.top_k(logits, k)
  p = jax.nn.softmax(vals, axis=-1)
  return jnp.zeros((T, E), F32).at[jnp.arange(T)[:, None], idx].set(p)


def make_set(case: Case, seed: int):
  dt = _dtype(case.dtype)
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  d, r, E = case.d, case.r, case.E
  a = (jax.random.normal(ks[1], (E, d, r), F32) / math.sqrt(d)).astype(dt)
  b = (jax.random.normal(ks[2], (E, r, d), F32) * 0.05).astype(dt)
  if case.kind == "perseq":
    B = case.T // case.L
    x = jax.random.normal(ks[0], (B, case.L, d), F32).astype(dt)
    idx = jax.random.randint(ks[3], (B,), 0, E)
    return (x, a, b, idx)
  x = jax.random.normal(ks[0], (case.T, d), F32).astype(dt)
  g = make_gates(ks[3], case.T, E, case.k)
  if case.kind == "fused":
    w = (jax.random.normal(ks[4], (d, d), F32) / math.sqrt(d)).astype(dt)
    bias = jax.random.normal(ks[5], (d,), F32).astype(dt)
    return (x, w, bias, a, b, g)
  return (x, a, b, g)


def active_experts(case: Case, inputs) -> int:
  if case.kind == "perseq":
    return int(len(np.unique(np.asarray(inputs[3]))))
  g = np.asarray(inputs[-1])
  return int(np.count_nonzero(np.abs(g).max(axis=0) > 0))


def roofline(case: Case, n_active: int):
  it = jnp.dtype(_dtype(case.dtype)).itemsize
  d, r, T = case.d, case.r, case.T
  weights = n_active * 2 * d * r * it
  io = 2 * T * d * it
  gates = 0 if case.kind == "perseq" else T * case.E * 4
  flops = 2 * T * case.k * r * 2 * d
  if case.kind == "fused":
    weights += d * d * it + d * it
    flops += 2 * T * d * d
  return dict(bytes=io + weights + gates, flops=flops)


def footprint(case: Case) -> int:
  it = jnp.dtype(_dtype(case.dtype)).itemsize
  f = 2 * case.T * case.d * it + 2 * case.E * case.d * case.r * it
  if case.kind == "fused":
    f += case.d * case.d * it
  return f


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def paths_for(case: Case, tune: bool):
  """[(label, fn(*inputs) -> y, tiles-or-None)]."""
  scale = 2.0 / case.r
  k = case.k
  out = []
  if case.kind == "mixture":
    for name, fn in MIX_PATHS.items():
      if name == "xla_dense_lowp" and case.dtype != "bf16":
        continue
      out.append((name, (lambda fn: lambda x, a, b, g: fn(x, a, b, g, scale, k))(fn), None))
    if tune:
      base = kernels.default_tiles(case.T, case.d, case.d, case.r, case.E, _dtype(case.dtype), "gpu")
      for i, over in enumerate(TUNE[case.cls]):
        t = dataclasses.replace(base, **over)
        if t == base:
          continue
        out.append((f"pallas_t{i}",
                    (lambda t: lambda x, a, b, g: path_pallas(x, a, b, g, scale, k, t))(t), t))
  elif case.kind == "fused":
    out.append(("pallas", lambda *v: fused_pallas(*v, scale, k), None))
    out.append(("xla_dense", lambda *v: fused_xla(*v, scale, k), None))
  else:
    out.append(("pallas", lambda *v: perseq_pallas(*v, scale), None))
    out.append(("xla_dense", lambda *v: perseq_xla(*v, scale), None))
  return out


def plan(case: Case):
  """(m, n_iter): every call in a timed program gets its own input set (m == n_iter), so XLA
  cannot merge identical calls (CSE) and nothing stays in L2 between calls."""
  n_iter = 32 if case.T <= 64 else 12
  return n_iter, n_iter


def build(case: Case, fn, m, n_iter, avals):
  def many(sets):
    return tuple(fn(*sets[i % m]) for i in range(n_iter))

  return jax.jit(many).lower(avals).compile()


def time_compiled(compiled, sets, reps):
  jax.block_until_ready(compiled(sets))
  jax.block_until_ready(compiled(sets))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(sets))
    ts.append(time.perf_counter() - t0)
  return ts


def measure_copy_bandwidth():
  n = 2**28  # 1 GiB of float32
  x = jnp.ones((n,), F32)
  f = jax.jit(lambda v: v * 1.0001)
  jax.block_until_ready(f(x))
  ts = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    ts.append(time.perf_counter() - t0)
  return 2 * 4 * n / statistics.median(ts) / 1e12


def rel_err(y, ref):
  y = np.asarray(y, np.float64)
  ref = np.asarray(ref, np.float64)
  den = np.linalg.norm(ref)
  return float(np.linalg.norm(y - ref) / den) if den > 0 else float(np.linalg.norm(y))


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def write(args, kind, dev, t_start, copy_tbs, overhead_us, results, final=False):
  meta = dict(
      device_kind=kind, platform=dev.platform, jax_version=jax.__version__,
      jaxlib_version=getattr(jax.lib, "__version__", None) or jax.__version__,
      python=platform.python_version(), command=" ".join([os.path.basename(sys.executable)] + sys.argv),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      assumed_peaks=dict(hbm_tbs=PEAK_HBM_TBS, bf16_tflops=PEAK_BF16_TFLOPS,
                         tf32_tflops=PEAK_TF32_TFLOPS, note="H100 SXM datasheet, dense"),
      measured_copy_tbs=copy_tbs, program_overhead_us=overhead_us, reps=args.reps, wall_s=round(time.time() - t_start, 1),
      timing="median over reps of one jitted program running the path n_iter times, each call on "
             "its own input set, divided by n_iter; 2 warm-ups; block_until_ready",
      roofline="bytes = x + y + gates + A,B of routed experts (+ W, bias for fused); "
               "flops = 2*T*k*r*(d_in+d_out) (+ 2*T*d*d for fused)")
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"adapter_mixture_{slug(kind)}")
  with open(base + ".json", "w") as f:
    json.dump(dict(meta=meta, results=results), f, indent=1)
  with open(base + ".md", "w") as f:
    f.write(markdown(meta, results))
  if final:
    print(markdown(meta, results))
  return base


def slug(s):
  return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")


def fmt_us(v):
  return "—" if v is None else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="the small default grid (same as --grid quick)")
  p.add_argument("--grid", choices=("quick", "full", "smoke"), default="quick")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--tune", action="store_true", help="also time alternative Pallas tiles")
  p.add_argument("--only", default="", help="comma list of substrings; keep matching cases")
  p.add_argument("--threads", type=int, default=8, help="parallel AOT compiles")
  args = p.parse_args(argv)
  grid = {"quick": quick_grid, "full": full_grid, "smoke": smoke_grid}[
      "quick" if args.quick else args.grid]()
  if args.only:
    keys = args.only.split(",")
    grid = [c for c in grid if any(k in c.name for k in keys)]
  dev = jax.devices()[0]
  kind = dev.device_kind
  print(f"device: {kind}  backend: {jax.default_backend()}  jax {jax.__version__}", flush=True)
  t_start = time.time()

  # 1. Build all executables in parallel (compilation dominates the wall time).
  jobs = []
  for case in grid:
    m, n_iter = plan(case)
    sets0 = make_set(case, 0)
    avals = tuple(tuple(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in sets0) for _ in range(m))
    del sets0
    tune = args.tune and case.kind == "mixture" and case.name in TUNED_CASES
    for label, fn, tiles in paths_for(case, tune):
      # The unrolled per-expert loop compiles slowly at large E: fewer calls per program.
      n_path = min(n_iter, max(4, 128 // case.E)) if label == "xla_loop" else n_iter
      jobs.append((case, label, fn, tiles, n_path, n_path, avals[:n_path]))

  def compile_job(job):
    case, label, fn, tiles, m, n_iter, avals = job
    t0 = time.time()
    try:
      return build(case, fn, m, n_iter, avals), None, time.time() - t0
    except Exception as e:  # pylint: disable=broad-except
      return None, f"{type(e).__name__}: {str(e)[:600]}", time.time() - t0

  with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as ex:
    compiled = list(ex.map(compile_job, jobs))
  print(f"compiled {len(jobs)} executables in {time.time() - t_start:.0f} s", flush=True)

  copy_tbs = measure_copy_bandwidth() if jax.default_backend() == "gpu" else None
  # Wall-clock cost of launching one (trivial) jitted program and waiting for it; every timed
  # program pays it once, i.e. overhead_us / n_iter per reported call (not subtracted).
  tiny = jnp.ones((8,), F32)
  noop = jax.jit(lambda v: v + 1).lower(tiny).compile()
  overhead_us = statistics.median(time_compiled(noop, tiny, 21)) * 1e6
  print(f"copy bandwidth {copy_tbs} TB/s, program overhead {overhead_us:.1f} us", flush=True)

  # 2. Time, case by case.
  results = []
  by_case = {}
  for job, (exe, err, ctime) in zip(jobs, compiled):
    by_case.setdefault(job[0], []).append((job, exe, err, ctime))
  for i, (case, entries) in enumerate(by_case.items()):
    m, n_iter = plan(case)
    sets = tuple(make_set(case, 1000 * i + s) for s in range(m))
    n_active = active_experts(case, sets[0])
    roof = roofline(case, n_active)
    rec = dict(case=dataclasses.asdict(case), name=case.name, m_sets=m, n_iter=n_iter,
               overhead_per_call_us=overhead_us / n_iter,
               active_experts=n_active, bytes=roof["bytes"], flops=roof["flops"], paths={})
    ref_out = None
    for (job, exe, err, ctime) in entries:
      label, tiles, n_path = job[1], job[3], job[5]
      entry = dict(compile_s=round(ctime, 2), n_iter=n_path)
      if tiles is not None:
        entry["tiles"] = dataclasses.asdict(tiles)
      if exe is None:
        entry["error"] = err
        rec["paths"][label] = entry
        print(f"  {case.name:60s} {label:16s} ERROR {err[:200]}", flush=True)
        continue
      try:
        ts = time_compiled(exe, sets[:n_path], args.reps)
        us = statistics.median(ts) / n_path * 1e6
        entry.update(us=us, us_min=min(ts) / n_path * 1e6, reps_us=[t / n_path * 1e6 for t in ts])
        y = exe(sets[:n_path])[0]
        if label == "xla_dense":
          ref_out = y
        entry["_y"] = y
      except Exception as e:  # pylint: disable=broad-except
        entry["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        traceback.print_exc()
      rec["paths"][label] = entry
    for label, entry in rec["paths"].items():
      y = entry.pop("_y", None)
      if y is not None and ref_out is not None:
        entry["rel_err_vs_xla_dense"] = rel_err(y, ref_out)
    if case.kind == "mixture":
      xla = {k: v["us"] for k, v in rec["paths"].items() if k in XLA_CONTRACT_PATHS and "us" in v}
    else:
      xla = {k: v["us"] for k, v in rec["paths"].items() if k.startswith("xla") and "us" in v}
    pal = {k: v["us"] for k, v in rec["paths"].items() if k.startswith("pallas") and "us" in v}
    if xla:
      best = min(xla, key=xla.get)
      rec["best_xla"] = best
      rec["best_xla_us"] = xla[best]
    if "pallas" in pal:
      us = pal["pallas"]
      rec["pallas_us"] = us
      rec["pallas_tbs"] = roof["bytes"] / us / 1e6
      rec["pallas_hbm_frac"] = rec["pallas_tbs"] / PEAK_HBM_TBS
      rec["pallas_tflops"] = roof["flops"] / us / 1e6
      if xla:
        rec["speedup_vs_best_xla"] = rec["best_xla_us"] / us
    if pal:
      bp = min(pal, key=pal.get)
      rec["best_pallas"] = bp
      rec["best_pallas_us"] = pal[bp]
    if xla:
      rec["best_xla_tbs"] = roof["bytes"] / rec["best_xla_us"] / 1e6
    fastest = min(list(xla.values()) + list(pal.values()) or [float("inf")])
    if roof["bytes"] / fastest / 1e6 > PEAK_HBM_TBS:
      rec["suspect"] = "faster than the HBM roofline: inputs cached or calls merged"
    results.append(rec)
    print(f"{case.name:60s} " + "  ".join(f"{k}={v['us']:.1f}us" if "us" in v else f"{k}=ERR"
                                          for k, v in rec["paths"].items())
          + (f"  speedup={rec.get('speedup_vs_best_xla', float('nan')):.2f}x"
             f"  hbm={rec.get('pallas_hbm_frac', float('nan')) * 100:.0f}%"), flush=True)
    del sets
    write(args, kind, dev, t_start, copy_tbs, overhead_us, results)

  base = write(args, kind, dev, t_start, copy_tbs, overhead_us, results, final=True)
  print(f"wrote {base}.json / .md in {time.time() - t_start:.0f} s")


TUNED_CASES = {
    "mixture_prefill_T8192_d4096_r16_E8_k2_bf16", "mixture_prefill_T8192_d4096_r64_E32_k2_bf16",
    "mixture_decode_T16_d4096_r64_E32_k2_bf16", "mixture_decode_T1_d4096_r64_E32_k2_bf16",
}


def markdown(meta, results):
  lines = [f"# Adapter mixture: Pallas vs XLA on {meta['device_kind']}", "",
           f"jax {meta['jax_version']}, {meta['date']}; command: `{meta['command']}`", "",
           f"Assumed peaks: HBM {PEAK_HBM_TBS} TB/s, bf16 {PEAK_BF16_TFLOPS:.0f} TFLOP/s, "
           f"TF32 {PEAK_TF32_TFLOPS:.0f} TFLOP/s (H100 SXM datasheet, dense)."
           + (f" Measured device copy (read+write): {meta['measured_copy_tbs']:.2f} TB/s."
              if meta.get("measured_copy_tbs") else ""), "",
           f"Timing: {meta['timing']}. Roofline: {meta['roofline']}.", "",
           "Times in µs. `best XLA` is the fastest of xla_dense / xla_ragged / xla_loop "
           "(xla_dense_lowp rounds the rank intermediate to bf16 and is shown for information "
           "only). `%HBM` = roofline bytes / pallas time / 3.35 TB/s. Every timed program also "
           f"pays a launch + sync overhead of ~{meta.get('program_overhead_us') or 0:.0f} µs once "
           "(measured on a trivial program), i.e. that / n_iter per call (n_iter = 32 decode, 12 "
           "prefill, fewer for xla_loop at large E); it is included, not subtracted.", ""]
  hdr = ("| kind | class | T | d | r | E | k | dtype | pallas | best tuned | xla_dense | xla_ragged "
         "| xla_loop | xla_dense_lowp | best XLA | speed-up | pallas TB/s (%HBM) | pallas TFLOP/s "
         "| rel err | note |")
  lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
  for r in results:
    c = r["case"]
    pth = r["paths"]

    def us(k):
      v = pth.get(k)
      if v is None:
        return "—"
      return "ERR" if "us" not in v else fmt_us(v["us"])

    tuned = (f"{fmt_us(r['best_pallas_us'])} ({r['best_pallas']})"
             if r.get("best_pallas") not in (None, "pallas") else "")
    lines.append(
        f"| {c['kind']} | {c['cls']} | {c['T']}{'(L=' + str(c['L']) + ')' if c['L'] else ''} "
        f"| {c['d']} | {c['r']} | {c['E']} | {c['k']} | {c['dtype']} | {us('pallas')} | {tuned} "
        f"| {us('xla_dense')} | {us('xla_ragged')} | {us('xla_loop')} | {us('xla_dense_lowp')} "
        f"| {r.get('best_xla', '—')} | "
        + (f"{r['speedup_vs_best_xla']:.2f}×" if "speedup_vs_best_xla" in r else "—")
        + " | "
        + (f"{r['pallas_tbs']:.2f} ({r['pallas_hbm_frac'] * 100:.0f}%)" if "pallas_tbs" in r else "—")
        + " | " + (f"{r['pallas_tflops']:.1f}" if "pallas_tflops" in r else "—")
        + " | " + (f"{pth['pallas'].get('rel_err_vs_xla_dense', float('nan')):.1e}"
                   if "pallas" in pth else "—") + " | " + r.get("suspect", "") + " |")
  lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
