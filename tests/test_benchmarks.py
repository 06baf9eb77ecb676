"""The benchmark's logic (not its speed: no timed assertions) and the runtime defaults."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import breakdown
from benchmarks import common
from benchmarks import jax_bench
from msatt_jax import runtime

import helpers
from helpers import REPO

REQUIRED_KEYS = {"model", "framework", "mode", "batch_size", "slices_per_s", "compile_s",
                 "step_s_median", "step_s_iqr", "flops_per_step", "peak_percent", "peak_mem_mb"}


def _clean_env(**extra: str) -> dict:
  """This environment without the runtime settings (so each test decides them)."""
  env = dict(os.environ)
  for name in ("XLA_FLAGS", runtime.OPT_ENV, runtime.REEXEC_MARK, runtime.TUNABLES_ENV,
               *runtime.MALLOC_ENV):
    env.pop(name, None)
  env = helpers.with_repo_on_path(env)
  env.update(extra)
  return env


# ------------------------------------------------------------------------------- runtime
def test_enabled_groups():
  assert runtime.enabled_groups({}) == runtime.DEFAULT_GROUPS == ("xla",)
  assert runtime.enabled_groups({runtime.OPT_ENV: "default"}) == ("xla",)
  assert runtime.enabled_groups({runtime.OPT_ENV: "all"}) == runtime.GROUPS
  assert runtime.enabled_groups({runtime.OPT_ENV: "none"}) == ()
  assert runtime.enabled_groups({runtime.OPT_ENV: "malloc"}) == ("malloc",)
  assert runtime.enabled_groups({runtime.OPT_ENV: "xla, hugepages"}) == ("xla", "hugepages")
  with pytest.raises(ValueError, match="unknown group"):
    runtime.enabled_groups({runtime.OPT_ENV: "fast"})


def test_user_values_win_and_strip_restores():
  flag = runtime.XLA_FLAGS[0].split("=")[0]
  env = {"XLA_FLAGS": f"{flag}=default --xla_foo=1", "MALLOC_ARENA_MAX": "4"}
  changed = runtime.apply_environment(env)
  assert env["XLA_FLAGS"] == f"{flag}=default --xla_foo=1"  # The user's value of that flag.
  assert env["MALLOC_ARENA_MAX"] == "4"
  assert "XLA_FLAGS" not in changed and "MALLOC_TRIM_THRESHOLD_" in changed
  env = {"XLA_FLAGS": "--xla_foo=1"}
  runtime.apply_environment(env)
  assert env["XLA_FLAGS"] == "--xla_foo=1 " + " ".join(runtime.XLA_FLAGS)
  runtime.strip_environment(env)
  assert env == {"XLA_FLAGS": "--xla_foo=1"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_hugepage_tunable_joins_the_users_tunables():
  env = {runtime.TUNABLES_ENV: "glibc.malloc.tcache_count=0"}
  assert runtime.TUNABLES_ENV in runtime.apply_environment(env, ("hugepages",))
  assert env[runtime.TUNABLES_ENV] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
  runtime.strip_environment(env)
  assert env == {runtime.TUNABLES_ENV: "glibc.malloc.tcache_count=0"}
  env = {runtime.TUNABLES_ENV: "glibc.malloc.hugetlb=0"}  # The user's choice stays.
  assert runtime.apply_environment(env, ("hugepages",)) == ()
  assert env == {runtime.TUNABLES_ENV: "glibc.malloc.hugetlb=0"}
  env = {}
  runtime.apply_environment(env, ("hugepages",))
  runtime.strip_environment(env)
  assert env == {}


_PROBE = ("import os, sys; from msatt_jax import runtime; "
          "open(sys.argv[1], 'a').write('start\\n'); runtime.configure(); "
          "print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('XLA_FLAGS'), "
          "os.environ.get('GLIBC_TUNABLES'))")


def test_configure_reexecutes_once_for_the_allocator_groups(tmp_path):
  starts = tmp_path / "starts"
  out = subprocess.run([sys.executable, "-c", _PROBE, str(starts)],
                       env=_clean_env(**{runtime.OPT_ENV: "all"}), capture_output=True,
                       text=True, check=True, cwd=REPO)
  assert starts.read_text().count("start") == 2  # The original process and its re-execution.
  assert out.stdout.split() == ["1", *runtime.XLA_FLAGS, runtime.HUGEPAGE_TUNABLE]


def test_configure_defaults_set_only_the_xla_flags_without_reexecuting(tmp_path):
  starts = tmp_path / "starts"
  out = subprocess.run([sys.executable, "-c", _PROBE, str(starts)], env=_clean_env(),
                       capture_output=True, text=True, check=True, cwd=REPO)
  assert starts.read_text().count("start") == 1
  assert out.stdout.split() == ["None", *runtime.XLA_FLAGS, "None"]


def test_configure_opt_out(tmp_path):
  starts = tmp_path / "starts"
  out = subprocess.run([sys.executable, "-c", _PROBE, str(starts)],
                       env=_clean_env(**{runtime.OPT_ENV: "none"}), capture_output=True,
                       text=True, check=True, cwd=REPO)
  assert starts.read_text().count("start") == 1
  assert out.stdout.split() == ["None", "None", "None"]


# ------------------------------------------------------------------------ FLOPs, breakdown
def test_matmul_flops_counts_every_scan_iteration():
  w = jnp.ones((8, 8))

  def f(x):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0] @ w

  jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 8))).jaxpr
  one = 2 * 4 * 8 * 8
  assert jax_bench.matmul_flops(jaxpr) == 6 * one
  assert jax_bench.matmul_flops(jaxpr, loops_once=True) == 2 * one


def test_module_path_and_attribution():
  name = "MSConvLSTMAtt"
  op = "jit(train_step)/transpose(jvp(MSConvLSTMAtt))/encoders/closed_call/encoder/encoder/convlstm/rnn/closed_call/cell.scan_fn/cell/hh/conv_general_dilated"
  assert breakdown.module_path(op, name) == "encoders/encoder/convlstm/rnn/cell/hh"
  # JAX 0.11 names the scan body's wrapper eval_jaxpr.
  assert breakdown.module_path(op.replace("closed_call", "eval_jaxpr"), name) == (
      "encoders/encoder/convlstm/rnn/cell/hh")
  assert breakdown.module_path("jit(train_step)/jvp(MSConvLSTMAtt)/pad", name) == ""
  assert breakdown.module_path("jit(train_step)/mul", name) is None
  hlo = "\n".join([
      f'%convolution.1 = f32[2] convolution(%a, %b), metadata={{op_name="{op}"}}',
      '%fusion.2 = f32[2] fusion(%a), metadata={op_name="jit(s)/jvp(MSConvLSTMAtt)/sam1/dot"}',
      '%fusion.3 = f32[2] fusion(%a), metadata={op_name="jit(s)/mul"}',
      '%while.4 = f32[2] while(%a), metadata={op_name="jit(s)/jvp(MSConvLSTMAtt)/encoders/w"}',
  ])
  times = {"convolution.1": 3.0, "fusion.2": 1.0, "fusion.3": 0.5, "while.4": 9.0, "x": 1.0}
  coarse, fine = breakdown.attribute(times, hlo, name, breakdown.MSCONVLSTM_ATT_PARTS)
  assert coarse == {"ConvLSTM (scale 1)": 3.0, "attention: refine conv + SAM": 1.0,
                    breakdown.OUTSIDE: 0.5}
  assert sum(fine.values()) == 4.5
  table = breakdown.format_breakdown(coarse, 0.9, fine)
  assert "ConvLSTM (scale 1)" in table and "66.7%" in table


def test_instruction_kinds_by_the_heaviest_op_inside():
  hlo = "\n".join([
      "%fused_computation.1 (p: f32[2]) -> f32[2] {",
      "  %p = f32[2] parameter(0)",
      "  %r = f32[] reduce(%p, %c), dimensions={0}, to_apply=%add",
      "}",
      "%fused_computation.2 (p: f32[2,3]) -> f32[3,2] {",
      "  %p = f32[2,3] parameter(0)",
      "  %e = f32[2,3] exponential(%p)",
      "  ROOT %t = f32[3,2] transpose(%e), dimensions={1,0}",
      "}",
      "ENTRY %main (a: f32[2]) -> f32[2] {",
      "  %convolution.3 = f32[2] convolution(%a, %a), window={size=1}",
      "  %ynn_fusion.4 = f32[] fusion(%a), kind=kCustom, calls=%fused_computation.1",
      "  %transpose_copy_fusion.5 = f32[3,2] fusion(%b), kind=kLoop, calls=%fused_computation.2",
      "  %dot.6 = f32[2] dot(%a, %a), lhs_contracting_dims={0}",
      '  %cudnn-conv.7 = (f32[2], u8[0]) custom-call(%a, %a), custom_call_target="__cudnn$convForward"',
      "  %add.8 = f32[2] add(%a, %a)",
      "  %while.9 = f32[2] while(%a), condition=%c, body=%b",
      "}",
  ])
  kinds = breakdown.instruction_kinds(hlo)
  assert kinds["convolution.3"] == kinds["cudnn-conv.7"] == breakdown.CONVOLUTIONS
  assert kinds["ynn_fusion.4"] == breakdown.REDUCTIONS
  assert kinds["transpose_copy_fusion.5"] == breakdown.LAYOUT
  assert kinds["dot.6"] == breakdown.MATMULS and kinds["add.8"] == breakdown.ELEMENTWISE
  times = {"convolution.3": 3.0, "cudnn-conv.7": 1.0, "ynn_fusion.4": 0.5, "add.8": 0.25,
           "while.9": 9.0, "unknown": 1.0}  # Loops contain others' time; unknown is left out.
  assert breakdown.by_kind(times, hlo) == {breakdown.CONVOLUTIONS: 4.0,
                                           breakdown.REDUCTIONS: 0.5,
                                           breakdown.ELEMENTWISE: 0.25}


# A GPU trace in miniature: the host plane holds launches, the device plane the kernels (a
# cuDNN call as two kernels, a fusion inside a command buffer) and a derived per-op line.
_GPU_TRACE = """
planes {
  name: "/host:CPU"
  lines { name: "launches" events { metadata_id: 3 duration_ps: 9000000
                                    stats { metadata_id: 1 str_value: "cudnn-conv.1" } } }
  event_metadata { key: 3 value { id: 3 name: "launch" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
planes {
  name: "/device:GPU:0"
  lines {
    name: "Stream #14(Compute)"
    events { metadata_id: 1 duration_ps: 2000000
             stats { metadata_id: 1 str_value: "command_buffer_775" } }
    events { metadata_id: 2 offset_ps: 3000000 duration_ps: 4000000
             stats { metadata_id: 1 str_value: "cudnn-conv.1" } }
    events { metadata_id: 2 offset_ps: 8000000 duration_ps: 4000000
             stats { metadata_id: 1 str_value: "cudnn-conv.1" } }
  }
  lines {
    name: "XLA Ops"
    events { metadata_id: 2 offset_ps: 3000000 duration_ps: 8000000
             stats { metadata_id: 1 str_value: "cudnn-conv.1" } }
  }
  event_metadata { key: 1 value { id: 1 name: "loop_multiply_fusion_47" } }
  event_metadata { key: 2 value { id: 2 name: "sm90_xmma_fprop" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""


# XLA:CPU in miniature, two steps: a convolution dispatched at 0 us and completed at 7 us (its
# 'end:' marker, on another thread), a fusion run from 0.2 to 3.2 us alongside it; then the
# convolution alone from 10 to 19 us.
_CPU_TRACE = """
planes {
  name: "/host:CPU"
  lines {
    name: "pool thread 1" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 100000
             stats { metadata_id: 1 str_value: "convolution.2" } }
    events { metadata_id: 2 offset_ps: 200000 duration_ps: 3000000
             stats { metadata_id: 1 str_value: "fusion.5" } }
    events { metadata_id: 1 offset_ps: 10000000 duration_ps: 100000
             stats { metadata_id: 1 str_value: "convolution.2" } }
  }
  lines {
    name: "pool thread 2" timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 7000000 }
    events { metadata_id: 3 offset_ps: 19000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "convolution.2" } }
  event_metadata { key: 2 value { id: 2 name: "fusion.5" } }
  event_metadata { key: 3 value { id: 3 name: "end: convolution.2" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""


def test_instruction_times_of_a_cpu_trace(tmp_path):
  """An asynchronous instruction runs from dispatch to its completion marker; time when two
  run at once is shared, so the times sum to the time anything ran."""
  path = tmp_path / "step.xplane.pb"
  path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(_CPU_TRACE))
  times = breakdown.instruction_times(str(path), steps=2)
  shared = 3e-6 / 2  # The fusion's 3 us, shared with the convolution.
  assert times == pytest.approx({"convolution.2": (7e-6 - shared + 9e-6) / 2,
                                 "fusion.5": shared / 2})
  assert sum(times.values()) == pytest.approx((7e-6 + 9e-6) / 2)


def test_instruction_times_of_a_gpu_trace(tmp_path):
  """Device kernels count, not host launches or derived lines; a command buffer's kernel
  counts for its fusion."""
  path = tmp_path / "step.xplane.pb"
  path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(_GPU_TRACE))
  times = breakdown.instruction_times(str(path), steps=2)
  assert times == pytest.approx({"loop_multiply_fusion.47": 1e-6, "cudnn-conv.1": 4e-6})


def test_stats_and_table():
  stats = common.step_stats([1.0, 2.0, 3.0, 4.0, 100.0])
  assert stats["step_s_median"] == 3.0 and stats["step_s_min"] == 1.0
  row = {"model": "unet", "framework": "jax", "mode": "train", "batch_size": 8,
         "compile_s": 1.0, "slices_per_s": 8 / 3.0, "gflop_per_step": None, **stats}
  table = common.format_table([row])
  assert table.splitlines()[0].startswith("model") and "3000.0 ±1000.0" in table
  assert common.format_markdown([row]).splitlines()[1].startswith("| ---")


# ----------------------------------------------------------------------- the whole command
def _run_benchmark(tmp_path, *args):
  out_json = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "benchmarks.run", "--models", "unet", "--set", "base_width=2",
         "--size", "32", "--batch_sizes", "2", "--steps", "2", "--warmup", "1",
         "--json", str(out_json), *args]
  proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, cwd=REPO,
                        timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(line) for line in out_json.read_text().splitlines()]
  printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(printed) == len(rows)
  for r in rows:
    assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
    assert r["slices_per_s"] > 0 and len(r["step_times_s"]) == 2
  return proc.stdout, rows


@pytest.mark.slow
def test_benchmark_command(tmp_path):
  stdout, rows = _run_benchmark(tmp_path, "--set", "depth=2", "--breakdown",
                                "--trace_dir", str(tmp_path / "traces"))
  assert "slices/s" in stdout and "GFLOP/step" in stdout
  assert {(r["framework"], r["mode"]) for r in rows} == {("jax", "inference"), ("jax", "train")}
  for r in rows:
    assert r["flops_per_step"] > 0 and r["peak_mem_mb"] > 0 and r["compile_s"] > 0
    # The driver applied the defaults: the XLA flags, not the allocator groups.
    assert r["runtime"]["XLA_FLAGS"] == " ".join(runtime.XLA_FLAGS)
    assert "MALLOC_ARENA_MAX" not in r["runtime"] and runtime.TUNABLES_ENV not in r["runtime"]
    assert r["breakdown"] and abs(sum(b["share"] for b in r["breakdown"]) - 1) < 1e-6
    assert r["breakdown_traced_ms"] > 0
    kinds = {k["part"]: k["ms_per_step"] for k in r["breakdown_kinds"]}
    assert kinds[breakdown.CONVOLUTIONS] > 0  # A U-Net step is mostly convolutions.
    kept = tmp_path / "traces" / f"unet_b2_default_{r['mode']}"
    assert (kept / "step.xplane.pb").stat().st_size > 0
    assert "HloModule" in (kept / "step.hlo.txt").read_text()
  assert "step time by part" in stdout and "traced instruction time" in stdout
  assert "instruction kind" in stdout


@pytest.mark.slow
def test_benchmark_command_compare_torch(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("monai")
  stdout, rows = _run_benchmark(tmp_path, "--compare-torch", "--modes", "train",
                                "--variant", "plain:runtime=none")
  assert {r["framework"] for r in rows} == {"jax", "jax[plain]", "pytorch"}
  assert "jax / pytorch = " in stdout and "jax / jax[plain] = " in stdout
  plain = next(r for r in rows if r["framework"] == "jax[plain]")
  assert plain["runtime"] == {runtime.OPT_ENV: "none"}


@pytest.mark.slow
def test_benchmark_command_baseline_interpreter(tmp_path):
  # Here the "baseline" is this very interpreter: the side exists, is labelled with its jax
  # version and gets a ratio line; with another environment it measures that stack.
  import jax  # pylint: disable=g-import-not-at-top
  stdout, rows = _run_benchmark(tmp_path, "--set", "depth=2", "--modes", "train",
                                "--baseline_python", sys.executable)
  label = f"jax[{jax.__version__}]"
  assert {r["framework"] for r in rows} == {"jax", label}
  assert f"jax / {label} = " in stdout


def test_variant_spec():
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  assert run._variant("stacked:convlstm_gate_convs=stacked,runtime=xla+malloc") == (
      "stacked", {"convlstm_gate_convs": "stacked"}, "xla,malloc")
  assert run._variant("plain:runtime=none") == ("plain", {}, "none")
  with pytest.raises(ValueError, match="unknown group"):
    run._variant("x:runtime=xla+fast")


def test_load_warning_when_the_cores_are_busy():
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  assert run.load_warning(1.99, 2) is None
  assert "load average 2.00 on 2 cores" in run.load_warning(2.0, 2)
  assert run.load_warning(6.5, 8) is None


def test_suite_defaults_yield_to_given_flags():
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  args = run.parse_args(["--suite", "gpu"])
  assert (args.models, args.modes, args.dtype, args.batch_sizes, args.size, args.window) == (
      ["msconvlstm_att"], ["train"], "bfloat16", [32, 64], 190, 5)
  assert args.case_shape == (240, 240, 155)
  assert args.peak_gflops == common.H100_BF16_DENSE_GFLOPS
  args = run.parse_args(["--suite", "gpu", "--batch_sizes", "128", "--dry-run"])
  assert args.batch_sizes == [128] and args.size == 32 and args.case_shape == (48, 48, 40)
  assert args.peak_gflops is None and args.overrides["lstm_features"] == "4"
  args = run.parse_args(["--models", "unet", "--set", "base_width=8"])
  assert args.case_shape == () and args.overrides == {"base_width": "8"}
  with pytest.raises(SystemExit):  # No measured model has the key.
    run.parse_args(["--models", "unet", "--set", "lstm_features=4"])


@pytest.mark.slow
def test_gpu_suite_dry_run_needs_no_tensorflow(tmp_path):
  """The GPU suite's logic, tiny, on CPU, where TensorFlow cannot be imported (as on a GPU
  machine that has JAX but no TensorFlow)."""
  blocker = tmp_path / "site"
  blocker.mkdir()
  (blocker / "sitecustomize.py").write_text(
      "import sys\nsys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n")
  out_json = tmp_path / "gpu.jsonl"
  env = _clean_env(MSATT_RUNTIME_DEFAULTS="none")
  env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
  proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "gpu", "--dry-run",
                         "--json", str(out_json)], env=env, capture_output=True, text=True,
                        cwd=REPO, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [json.loads(line) for line in out_json.read_text().splitlines()]
  steps = [r for r in rows if r["kind"] == "step"]
  (case,) = [r for r in rows if r["kind"] == "case_latency"]
  assert [(r["model"], r["mode"], r["batch_size"]) for r in steps] == [
      ("msconvlstm_att", "train", 2)]
  for r in steps:
    assert r["schedule_hours"] == pytest.approx(
        common.PAPER_SLICE_STEPS / r["slices_per_s"] / 3600)
  assert case["case_shape"] == [48, 48, 40] and case["latency_s_median"] > 0
  assert "500-epoch schedule" in proc.stdout and "segment one 48x48x40 case" in proc.stdout


@pytest.mark.slow
def test_the_models_pools_differentiate_without_select_and_scatter():
  """What benchmarks/experiments/pool_forms.py measured: nn.max_pool's gradient is a
  select_and_scatter, the models' own pools (common.max_pool) avoid it."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from msatt_jax.models import UNet  # pylint: disable=g-import-not-at-top
  x = jnp.ones((1, 16, 16, 4))
  flax_pool = jax.jit(jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)))))
  assert "select_and_scatter" in flax_pool.lower(x).as_text()
  model = UNet(num_classes=4, base_width=2, depth=2)
  variables = model.init(jax.random.key(0), x)
  loss = lambda v: jnp.sum(model.apply(v, x, train=True, mutable=["batch_stats"])[0])
  assert "select_and_scatter" not in jax.jit(jax.grad(loss)).lower(variables).as_text()


def test_conv_kernels_are_the_same_convolutions():
  """benchmarks.experiments.conv_kernels times the same three convolutions in both
  frameworks."""
  pytest.importorskip("torch")
  from benchmarks.experiments import conv_kernels  # pylint: disable=g-import-not-at-top
  arrays = conv_kernels.layer_arrays(2, 6, 3, 4)
  ours = conv_kernels.jax_convolutions(*arrays)
  theirs = conv_kernels.torch_convolutions(*arrays)
  assert set(ours) == set(theirs) == set(conv_kernels.PARTS)
  to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours["forward"](), to_nhwc(theirs["forward"]()), atol=1e-5)
  np.testing.assert_allclose(ours["input grad"](), to_nhwc(theirs["input grad"]()), atol=1e-5)
  np.testing.assert_allclose(ours["weight grad"](),
                             theirs["weight grad"]().numpy().transpose(2, 3, 1, 0), atol=1e-4)


@pytest.mark.slow
def test_memory_benchmark_runs_the_trainer_under_each_setting(capsys):
  from benchmarks import memory as memory_bench  # pylint: disable=g-import-not-at-top
  records = memory_bench.main(["--config=configs/tiny.py", "--steps=6", "--eval_every_steps=3",
                               "--log_every_steps=1", "--batch_size=8",
                               "--override=model.base_width=4", "--override=model.depth=2",
                               "--settings=default,none", "--rss_limit_gb=8"])
  assert [r["setting"] for r in records] == ["default", "none"]
  for r in records:
    assert r["exit"] == 0 and not r["killed"], r.get("tail")
    assert 0.2 < r["peak_rss_gb"] < 8
    assert len(r["rss_after_validation_gb"]) == 2  # Steps 3 and 6.
    assert r["cpu_ms_per_slice_median"] > 0 and r["slices_per_s"] > 0
    assert "GB of host memory" in r["estimate"]
  out = capsys.readouterr().out
  assert "| setting | peak RSS GB |" in out and "the trainer's estimate" in out
