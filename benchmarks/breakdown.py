"""Where a compiled step spends its time, by model part, from a JAX profiler trace.

XLA:CPU (and GPU) record one trace event per executed HLO instruction (kernel, fusion, library
call). Each instruction of the optimised HLO carries the `op_name` of the JAX operation it
came from, and Flax puts the module path in it (`.../jvp(MSConvLSTMAtt)/encoders/convlstm/...`
forward, `.../transpose(jvp(MSConvLSTMAtt))/...` backward). Summing event durations by module
path gives the time of each part in the real step, forward and backward together, instead of
timing parts compiled on their own.

The durations are the instructions' own wall times; independent instructions may run
concurrently, so the parts are reported as shares of their sum and scaled to the step time.
"""

import collections
import glob
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

# Coarse parts of MSConvLSTM-Att: (part, regex over the module path inside the model).
MSCONVLSTM_ATT_PARTS: Tuple[Tuple[str, str], ...] = (
    ("ConvLSTM (scale 1)", r"(^|/)convlstm(/|$)"),
    ("encoders: SE-Inception, SE-ResNet, rest", r"^encoders(/|$)"),
    ("single/multi-scale fusion", r"^(single\d+|multi_conv\d+)(/|$)"),
    ("attention: refine conv + SAM", r"^(refine\d+|sam\d+)(/|$)"),
    ("heads: classifiers", r"^classifier\d+(/|$)"),
)
TOP_LEVEL = "model top level (outside its sub-modules)"
OUTSIDE = "loss, Adam, update, checks"
OTHER = "unattributed"

PARTS = {"msconvlstm_att": MSCONVLSTM_ATT_PARTS}

# Names JAX gives to call wrappers, not modules.
_WRAPPERS = {"closed_call", "core_call", "pjit", "checkpoint", "remat", "custom_jvp_call",
             "custom_vjp_call", "custom_vjp_call_jaxpr", "eval_jaxpr"}
# Events that enclose other instructions' events (their bodies are counted themselves).
_CONTAINERS = re.compile(r"^(while|call|conditional|async)")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r"metadata=\{[^}]*?op_name=\"([^\"]*)\"")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
# Lines a trace may add to a device plane that repeat the kernels' time per op or per module.
_DERIVED_LINES = {"XLA Ops", "XLA Modules", "Steps", "Framework Name Scope", "Framework Ops",
                  "Source code"}
# Opcodes that carry a fusion's work, whose op_name names the fusion's module best.
_HEAVY = ("convolution", "dot", "custom-call", "reduce-window")


def _instructions(hlo_text: str) -> Iterator[Tuple[str, str, str, str, bool]]:
  """(computation, name, opcode, rest of the line, is root) of each instruction of an HLO text."""
  computation = ""
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("{")[0]:
      computation = header.group(1)
      continue
    m = _DEF.match(line)
    if m:
      yield (computation, *m.groups(), line.lstrip().startswith("ROOT"))


def instruction_op_names(hlo_text: str, model_name: Optional[str] = None) -> Dict[str, str]:
  """Instruction name -> the op_name it is attributed to ('' where none), in an HLO text.

  A fusion or call takes the op_name of the convolution or dot inside it (its own metadata is
  often that of a cheap fused op at the model's top level); an instruction without metadata
  (XLA creates some, e.g. rewritten backward convolutions) takes the first op_name inside the
  model found among its operands, breadth first.
  """
  own: Dict[str, str] = {}
  opcode: Dict[str, str] = {}
  operands: Dict[str, List[str]] = {}
  calls: Dict[str, List[str]] = {}
  members: Dict[str, List[str]] = collections.defaultdict(list)
  for computation, name, op, rest, _ in _instructions(hlo_text):
    meta = _OP_NAME.search(rest)
    own[name] = meta.group(1) if meta else ""
    opcode[name] = op
    body = rest.split(", metadata=")[0]
    calls[name] = _CALLS.findall(body)
    operands[name] = [t for t in re.findall(r"%([\w.\-]+)", body) if t not in calls[name]]
    members[computation].append(name)

  def inside(op_name: str) -> bool:
    return bool(op_name) and (model_name is None or module_path(op_name, model_name) is not None)

  def from_calls(name: str) -> str:
    found = [m for comp in calls.get(name, ()) for m in members.get(comp, ())
             if opcode[m] in _HEAVY and inside(own[m])]
    # One inside a sub-module over one at the model's top level, then the heaviest kind of op.
    found.sort(key=lambda m: (model_name is not None and not module_path(own[m], model_name),
                              _HEAVY.index(opcode[m])))
    return own[found[0]] if found else ""

  def from_operands(name: str) -> str:
    seen, frontier = {name}, list(operands.get(name, ()))
    for _ in range(4):
      nxt = []
      for o in frontier:
        if o in seen or o not in own:
          continue
        seen.add(o)
        if inside(own[o]):
          return own[o]
        nxt += operands.get(o, [])
      frontier = nxt
    return ""

  return {name: from_calls(name) or own[name] or from_operands(name) for name in own}


# Kinds of work, for the breakdown by instruction kind: a fusion counts as the heaviest kind of
# op it contains (a convolution with its fused bias add is convolution work), and as a layout
# change when that is what it produces (its root is a transpose, copy or concatenation).
CONVOLUTIONS, MATMULS, REDUCTIONS = "convolutions", "matmuls", "reductions"
LAYOUT = "transposes, copies, concatenations"
ELEMENTWISE = "elementwise and other"
_KIND_OF_OPCODE = (
    (CONVOLUTIONS, ("convolution",)),
    (MATMULS, ("dot",)),
    (REDUCTIONS, ("reduce", "reduce-window", "select-and-scatter", "scatter")),
)
_LAYOUT_OPCODES = ("transpose", "copy", "concatenate")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def instruction_kinds(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> the kind of work it does (CONVOLUTIONS, MATMULS, ...), in an HLO text.

  A fusion or call is the heaviest kind among the instructions of the computations it calls, or
  a layout change if it has no convolution, matmul or reduction and its root is one; a library
  custom call (cuDNN, cuBLAS) is a convolution or matmul by its target's name.
  """
  opcodes: Dict[str, set] = collections.defaultdict(set)  # Computation -> opcodes in it.
  roots: Dict[str, str] = {}  # Computation -> its root's opcode.
  own: Dict[str, Tuple[str, List[str], str]] = {}  # Name -> (opcode, called computations, target).
  for computation, name, op, rest, is_root in _instructions(hlo_text):
    body = rest.split(", metadata=")[0]
    target = _TARGET.search(rest)
    own[name] = (op, _CALLS.findall(body), target.group(1).lower() if target else "")
    opcodes[computation].add(op)
    if is_root:
      roots[computation] = op

  def kind(op: str, called: Sequence[str], target: str) -> str:
    ops = {op}.union(*(opcodes.get(c, set()) for c in called))
    if "conv" in target:
      return CONVOLUTIONS
    if any(k in target for k in ("gemm", "matmul", "cublas")):
      return MATMULS
    heavy = next((k for k, members in _KIND_OF_OPCODE if ops & set(members)), None)
    if heavy:
      return heavy
    if op in _LAYOUT_OPCODES or any(roots.get(c) in _LAYOUT_OPCODES for c in called):
      return LAYOUT
    return ELEMENTWISE

  return {name: kind(*info) for name, info in own.items()}


def by_kind(instruction_times: Mapping[str, float], hlo_text: str) -> Dict[str, float]:
  """Seconds per kind of work (see `instruction_kinds`) of one step."""
  kinds = instruction_kinds(hlo_text)
  out: Dict[str, float] = collections.defaultdict(float)
  for name, seconds in instruction_times.items():
    if name in kinds and not _CONTAINERS.match(name):
      out[kinds[name]] += seconds
  return dict(out)


def module_path(op_name: str, model_name: str) -> Optional[str]:
  """The module path inside the model ('' at its top level), None outside the model.

  'jit(train_step)/transpose(jvp(MSConvLSTMAtt))/encoders/convlstm/rnn/conv_general_dilated'
  -> 'encoders/convlstm/rnn'; wrappers such as 'vmap(encoders)' give their module's name.
  """
  parts = op_name.split("/")
  for i, part in enumerate(parts):
    if re.search(rf"(^|\(){re.escape(model_name)}\)*$", part):
      inner = parts[i + 1:-1]  # The last component is the primitive.
      names: List[str] = []
      for p in inner:
        m = re.fullmatch(r"(?:\w+\()*(\w+)\)*", p)
        # Skip jit-wrapped functions, call wrappers, and a module repeated by its wrapper
        # ('encoder/encoder' under nn.vmap).
        if (m and not p.startswith("jit(") and m.group(1) not in _WRAPPERS
            and (not names or names[-1] != m.group(1))):
          names.append(m.group(1))
      return "/".join(names)
  return None


def trace_instruction_times(run: Callable[[], None], steps: int,
                            keep_dir: Optional[str] = None) -> Dict[str, float]:
  """Seconds per HLO instruction name over `steps` calls of `run`, from a profiler trace.

  `keep_dir`: a folder to keep the trace in (as `step.xplane.pb`).
  """
  import jax  # pylint: disable=g-import-not-at-top  (the driver formats without JAX)
  workdir = tempfile.mkdtemp(prefix="msatt-trace-")
  try:
    with jax.profiler.trace(workdir):
      for _ in range(steps):
        run()
    paths = glob.glob(os.path.join(workdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError("The profiler wrote no trace.")
    if keep_dir:
      os.makedirs(keep_dir, exist_ok=True)
      shutil.copyfile(paths[0], os.path.join(keep_dir, "step.xplane.pb"))
    return instruction_times(paths[0], steps)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def instruction_times(xplane_path: str, steps: int = 1) -> Dict[str, float]:
  """Seconds per HLO instruction name and step in a saved trace of `steps` steps.

  Events carry their instruction in an `hlo_op` statistic: XLA:CPU's on the host plane, GPU
  kernels (several per cuDNN or fused instruction) on the device planes. Where device events
  exist only they count: the host's events are then the launches, not the work. A kernel run
  inside an XLA:GPU command buffer (a CUDA graph) carries the buffer's name instead; its own
  name is its fusion's, with '_N' for '.N'.

  XLA:CPU runs some instructions (its convolutions) asynchronously: their event covers the
  dispatch, and an 'end: NAME' marker the completion. Where every run of an instruction has
  such a marker, it runs from start to marker. XLA:CPU also runs independent instructions at
  once; each moment of the host's time is shared equally among the instructions running then,
  so the host's times sum to the time anything ran, never more.
  """
  import jax  # pylint: disable=g-import-not-at-top
  space = jax.profiler.ProfileData.from_file(xplane_path)
  device: Dict[str, float] = collections.defaultdict(float)
  spans: Dict[str, List[Tuple[int, int]]] = collections.defaultdict(list)  # Host (start, end).
  ends: Dict[str, List[int]] = collections.defaultdict(list)
  with warnings.catch_warnings():  # jaxlib 0.12's event-stats type lacks __module__ (Py 3.12).
    warnings.filterwarnings("ignore", "builtin type event_stats", DeprecationWarning)
    for plane in space.planes:
      on_device = plane.name.startswith("/device:")
      if not on_device and not plane.name.startswith("/host:CPU"):
        continue
      for line in plane.lines:
        if line.name in _DERIVED_LINES:
          continue
        for event in line.events:
          op = dict(event.stats).get("hlo_op")
          if op and op.startswith("command_buffer"):
            op = re.sub(r"_(\d+)$", r".\1", event.name)
          if op and on_device:
            device[op] += event.duration_ns * 1e-9
          elif op:
            spans[op].append((event.start_ns, event.end_ns))
          elif not on_device and event.name.startswith("end: "):
            ends[event.name[len("end: "):]].append(event.start_ns)
  if device:
    return {k: v / steps for k, v in device.items()}
  for op, op_spans in spans.items():
    if len(ends.get(op, ())) == len(op_spans):
      op_spans.sort()
      spans[op] = [(start, max(end, done))
                   for (start, end), done in zip(op_spans, sorted(ends[op]))]
  return {k: v / steps for k, v in _shared_times(spans).items()}


def _shared_times(spans: Mapping[str, Sequence[Tuple[int, int]]]) -> Dict[str, float]:
  """Seconds per name when each nanosecond is split equally among the spans covering it."""
  edges = sorted(edge for name, name_spans in spans.items() for start, end in name_spans
                 for edge in ((start, +1, name), (end, -1, name)))
  times: Dict[str, float] = collections.defaultdict(float)
  active: Dict[str, int] = collections.defaultdict(int)
  running, last = 0, None
  for t, step, name in edges:
    if running and t > last:
      for other, count in active.items():
        times[other] += (t - last) * 1e-9 * count / running
    active[name] += step
    running += step
    if not active[name]:
      del active[name]
    last = t
  return dict(times)


def attribute(instruction_times: Mapping[str, float], hlo_text: str, model_name: str,
              parts: Sequence[Tuple[str, str]]) -> Tuple[Dict[str, float], Dict[str, float]]:
  """(seconds per coarse part, seconds per module path) of one step."""
  op_names = instruction_op_names(hlo_text, model_name)
  coarse: Dict[str, float] = collections.defaultdict(float)
  fine: Dict[str, float] = collections.defaultdict(float)
  for name, seconds in instruction_times.items():
    if name not in op_names or _CONTAINERS.match(name):
      continue
    path = module_path(op_names[name], model_name)
    if path is None:
      part = OUTSIDE if op_names[name] else OTHER
    elif not path:
      part = TOP_LEVEL
    elif parts:
      part = next((p for p, rx in parts if re.search(rx, path)), TOP_LEVEL)
    else:  # No named parts for this model: its top-level modules.
      part = path.split("/")[0]
    coarse[part] += seconds
    fine[path if path is not None else f"({part})"] += seconds
  return dict(coarse), dict(fine)


def format_breakdown(coarse: Mapping[str, float], step_s: float,
                     fine: Optional[Mapping[str, float]] = None, top: int = 12,
                     label: str = "part") -> str:
  """A table of parts: share of the instructions' summed time and that share of the step."""
  total = sum(coarse.values()) or 1.0
  lines = [f"{label:<52} {'share':>7} {'ms/step':>9}"]
  for part, seconds in sorted(coarse.items(), key=lambda kv: -kv[1]):
    share = seconds / total
    lines.append(f"{part:<52} {100 * share:6.1f}% {1e3 * share * step_s:9.1f}")
  if fine:
    total = sum(fine.values()) or 1.0
    lines.append("")
    lines.append(f"{'module path (top ' + str(top) + ')':<52} {'share':>7} {'ms/step':>9}")
    for path, seconds in sorted(fine.items(), key=lambda kv: -kv[1])[:top]:
      share = seconds / total
      lines.append(f"{path or '(top level)':<52} {100 * share:6.1f}% {1e3 * share * step_s:9.1f}")
  return "\n".join(lines)


def rows(coarse: Mapping[str, float], step_s: float) -> List[Dict[str, float]]:
  total = sum(coarse.values()) or 1.0
  return [{"part": p, "share": s / total, "ms_per_step": 1e3 * s / total * step_s}
          for p, s in sorted(coarse.items(), key=lambda kv: -kv[1])]
