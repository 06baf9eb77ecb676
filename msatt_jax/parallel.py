"""Where the train state and the batches live: one device, pmap, or jit over a device mesh.

`config.parallel` picks a strategy; the trainer only calls its methods:

- 'single': the 'sharding' strategy below, on one device.
- 'pmap': `jax.pmap` over the local devices (the classic multi-GPU recipe): the state is
  stacked with one copy per device, each process's rows of the global batch are split per
  device, and gradients, the loss and BatchNorm statistics are averaged over the named axis
  `AXIS` (the model is built with `axis_name=AXIS`; the batch-pooled Dice sums are psum'd).
- 'sharding': `jax.jit` over a 1-D mesh ('data',) of the devices of every process: batches
  are sharded along their leading axis, the state is replicated, and XLA inserts the
  collectives, so the program is the single-device one.
- 'auto': 'sharding' when more than one device takes part, else 'single'.

Every strategy has one *canonical* layout of the state: a single logical copy, replicated over
the devices in use (`put_canonical` from host values, `to_canonical` from the step functions'
layout, `to_step_layout` back). Checkpoints are written and restored in it, so a checkpoint
written in one mode restores in any other, and Orbax writes it once (with several processes,
cooperatively: every process calls save).

Several processes (hosts): `initialize_distributed` calls `jax.distributed.initialize` before
anything touches a device; each process then reads only its own rows of every global batch
(`process_index`, `process_count`) and the arrays are assembled with
`jax.make_array_from_process_local_data`.
"""

import functools
import socket
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from msatt_jax import steps

AXIS = "data"
MODES = ("auto", "single", "pmap", "sharding")

Batch = Dict[str, Any]
StepFn = Callable[..., Tuple[Any, Dict[str, Any]]]


class DistributedInitError(ConnectionError, ValueError):
  """jax.distributed could not be set up (unreachable coordinator, bad settings)."""


# ---------------------------------------------------------------------------------------------
# Several processes.


def split_address(address: str) -> Tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port), or a clear error."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"config.distributed.coordinator_address={address!r} must be HOST:PORT, "
                     "e.g. 'node001:1234' (process 0's host and a free port).")
  return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout: float, what: str) -> None:
  """Polls a TCP connection to the coordinator until it answers, or raises after `timeout` s.

  jax.distributed aborts the whole process (no Python exception) when it cannot connect, so
  the reachability check happens here first, where the error can say what to fix.
  """
  host, port = split_address(address)
  deadline = time.monotonic() + timeout
  while True:
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, remaining))):
        return
    except OSError as e:
      if remaining <= 0:
        raise DistributedInitError(
            f"Could not reach the coordinator at {address} within {timeout:g} s ({what}): "
            f"{e.strerror or e}. Check that process 0 is running with the same "
            "--config.distributed.coordinator_address and that the port is reachable from "
            "this host, or raise --config.distributed.initialization_timeout.") from e
      time.sleep(min(0.25, max(remaining, 0.0)))


def check_port_free(address: str) -> None:
  """Process 0 serves the coordinator on the address's port: it must be free."""
  _, port = split_address(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    # As the coordinator's server does: a port in TIME_WAIT from an earlier run is fine.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise DistributedInitError(
          f"Process 0 serves the coordinator on port {port} ({address}), but the port is in "
          f"use: {e.strerror or e}. Choose another port in "
          "--config.distributed.coordinator_address.") from e


def initialize_distributed(dist: Optional[ml_collections.ConfigDict]) -> None:
  """Joins the other processes when `dist.enabled`; a clear error after `initialization_timeout`.

  Unset coordinator_address / num_processes / process_id are taken from the cluster
  environment (SLURM, Open MPI, Kubernetes, Cloud TPU), as jax.distributed detects them; the
  reachability check runs when the address and this process's id are configured.
  """
  if dist is None or not dist.get("enabled", False) or jax.distributed.is_initialized():
    return
  address, count, pid = dist.coordinator_address, dist.num_processes, dist.process_id
  timeout = int(dist.initialization_timeout)
  if timeout <= 0:
    raise ValueError(f"config.distributed.initialization_timeout must be > 0 s, got {timeout}.")
  if count is not None and (count < 1 or (pid is not None and not 0 <= pid < count)):
    raise ValueError(f"config.distributed.process_id={pid} must be in 0..num_processes-1 "
                     f"(num_processes={count}).")
  what = f"process {pid} of {count}"
  if address is not None and pid is not None:
    if pid == 0:
      check_port_free(address)
    else:
      wait_for_coordinator(address, timeout, what)
  logging.info("Joining the distributed run through the coordinator at %s (%s).",
               address or "the cluster's address", what)
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=pid, initialization_timeout=timeout)
  except ValueError as e:
    if address is None:
      raise DistributedInitError(
          "config.distributed.enabled is set but the run's coordinator is unknown: set "
          "--config.distributed.coordinator_address=HOST:PORT (process 0's host), "
          "--config.distributed.num_processes and --config.distributed.process_id, or start "
          f"the processes under a cluster manager JAX detects (SLURM, Open MPI): {e}") from e
    raise


# ---------------------------------------------------------------------------------------------
# Small pure helpers.


def _first_copy(x: jax.Array) -> jax.Array:
  """The copy of a pmap output on the first local device, without its device axis.

  `x[0]` would gather across devices under the jit-based pmap; this reads one buffer.
  """
  return x.addressable_data(0).reshape(x.shape[1:])


def _split_rows(x: Any, num: int) -> np.ndarray:
  """(B, ...) -> (num, B / num, ...) with a clear message when B does not divide."""
  x = np.asarray(x)
  if x.ndim == 0 or x.shape[0] % num:
    raise ValueError(f"Cannot split a batch of shape {x.shape} over {num} devices: the "
                     "leading size must be a multiple of the device count.")
  return x.reshape((num, x.shape[0] // num) + x.shape[1:])


def _process_rows(x: Any, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous rows of a global batch (the input pipeline's split)."""
  x = np.asarray(x)
  local = x.shape[0] // process_count
  return x[process_index * local:(process_index + 1) * local]


def _global_from_host(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a value every process holds in full (any sharding, any process)."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(jax.device_get(x))
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class CompiledStep:
  """A step function of a strategy: called with (state, host batch), it places the batch, runs
  the jitted or pmapped function and hands its outputs on; `memory` is XLA's memory analysis of
  that same compilation (the jit cache: it compiles once, whichever comes first)."""

  def __init__(self, fn: Callable[..., Any], place: Callable[[Batch], Batch],
               finish: Callable[[Any], Any] = lambda out: out):
    self._fn, self._place, self._finish = fn, place, finish

  def __call__(self, state: Any, batch: Batch) -> Any:
    return self._finish(self._fn(state, self._place(batch)))

  def memory(self, state: Any, batch: Batch) -> Any:
    """XLA's CompiledMemoryStats of the step on these shapes (None where unavailable)."""
    try:
      return self._fn.lower(state, self._place(batch)).compile().memory_analysis()
    except (AttributeError, NotImplementedError):
      return None


# ---------------------------------------------------------------------------------------------
# Strategies.


class Parallel:
  """What every strategy shares: the devices and processes, and the canonical layout of the state.

  The state has two layouts. The canonical one is a single logical copy, replicated over the
  devices in use (`replicated`): checkpoints are written and restored in it, and callers get
  it back. The step layout is what the compiled step functions take and return; it is the
  canonical one except under pmap. `to_step_layout` and `to_canonical` convert between them.
  """

  mode: str
  axis_name: Optional[str] = None  # The named device axis the model and train_step use.

  def __init__(self, devices: Sequence[jax.Device]):
    self.devices = tuple(devices)  # Every device taking part, grouped by process.
    self.process_index = jax.process_index()
    self.process_count = jax.process_count()
    self.local_devices = tuple(d for d in self.devices if d.process_index == self.process_index)
    # Auto axes: XLA propagates shardings through the model (reshapes of the batch axis, as in
    # the quadrant split of MSConvLSTM-Att, need no annotations); make_mesh defaults to Explicit.
    self.mesh = jax.make_mesh((len(self.devices),), (AXIS,), axis_types=(AxisType.Auto,),
                              devices=self.devices)
    self.replicated = NamedSharding(self.mesh, P())  # The canonical layout.

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def is_primary(self) -> bool:
    """The process that writes logs and summaries (checkpoints are written by all)."""
    return self.process_index == 0

  def describe(self) -> str:
    return (f"{self.mode}: {self.num_devices} {self.devices[0].platform} device(s) in "
            f"{self.process_count} process(es)")

  def check_batch_size(self, batch_size: int) -> None:
    """The global batch must split evenly over the processes and the devices."""
    if batch_size <= 0 or batch_size % self.num_devices:
      raise ValueError(
          f"config.batch_size={batch_size} is the global batch; it must be a positive multiple "
          f"of the {self.num_devices} devices in use ({self.describe()}). Choose a multiple of "
          f"{self.num_devices}, or set --config.num_devices.")

  def primary_first(self, fn: Callable[[], Any]) -> Any:
    """Runs fn on process 0, then on the others: shared files get one writer."""
    if self.process_count == 1:
      return fn()
    if self.is_primary:
      out = fn()
      multihost_utils.sync_global_devices("msatt_primary_first")
      return out
    multihost_utils.sync_global_devices("msatt_primary_first")
    return fn()

  def create_state(self, init_fn: Callable[[jax.Array], Any], rng: jax.Array) -> Any:
    """init_fn(rng) run once (`steps.run_once`), in the canonical layout."""
    return self.put_canonical(steps.run_once(init_fn, rng))

  def put_canonical(self, tree: Any) -> Any:
    """Values every process holds in full (on the host or any device) -> the canonical layout."""
    return jax.tree.map(lambda x: _global_from_host(x, self.replicated), tree)

  def to_step_layout(self, tree: Any) -> Any:
    """Canonical (or host) state -> the layout the step functions take."""
    return self.put_canonical(tree)

  def to_canonical(self, tree: Any) -> Any:
    """State in the step layout -> canonical, for checkpoints and callers."""
    return tree

  def place_batch(self, batch: Batch) -> Batch:
    """This process's rows of a global batch -> device arrays for the train step."""
    raise NotImplementedError

  def train_step_fn(self, step_fn: StepFn) -> Callable[[Any, Batch], Tuple[Any, Dict[str, Any]]]:
    """(state, this process's rows) -> (state, metrics); the state argument is donated."""
    raise NotImplementedError

  def eval_step_fn(self, eval_fn: Callable[[Any, Batch], Dict[str, Any]]
                   ) -> Callable[[Any, Batch], Dict[str, np.ndarray]]:
    """(state, a whole global batch, held by every process) -> numpy outputs for all rows."""
    raise NotImplementedError


class Sharded(Parallel):
  """jax.jit over a 1-D mesh: batch sharded over AXIS, state replicated."""

  mode = "sharding"

  def __init__(self, devices: Sequence[jax.Device]):
    super().__init__(devices)
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def place_batch(self, batch: Batch) -> Batch:
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
        batch)

  def _place_global_batch(self, batch: Batch) -> Batch:
    """A global batch every process holds in full -> sharded over AXIS."""
    def place(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.batch_sharding, lambda i: x[i])
    return jax.tree.map(place, batch)

  def train_step_fn(self, step_fn: StepFn):
    step = jax.jit(step_fn, in_shardings=(self.replicated, self.batch_sharding),
                   out_shardings=self.replicated, donate_argnums=(0,))
    return CompiledStep(step, self.place_batch)

  def eval_step_fn(self, eval_fn):
    # Replicated outputs: every process can read every row without a cross-host gather.
    step = jax.jit(eval_fn, in_shardings=(self.replicated, self.batch_sharding),
                   out_shardings=self.replicated)
    return CompiledStep(step, self._place_global_batch, jax.device_get)


class Single(Sharded):
  """`Sharded` over one device (a one-device mesh has no collectives to insert)."""

  mode = "single"


class Pmapped(Parallel):
  """jax.pmap over the local devices of every process, collectives over the axis AXIS.

  Its step layout stacks one copy of the state per local device along a leading axis.
  """

  mode = "pmap"
  axis_name = AXIS

  def __init__(self, devices: Sequence[jax.Device]):
    super().__init__(devices)
    # Host-local stacked layout: what pmap takes and returns on each process.
    self.stacked = NamedSharding(Mesh(np.asarray(self.local_devices), (AXIS,)), P(AXIS))

  def to_step_layout(self, tree: Any) -> Any:
    def stack(x):
      shards = {s.device: s.data for s in x.addressable_shards}
      copies = [shards[d].reshape((1,) + x.shape) for d in self.local_devices]
      return jax.make_array_from_single_device_arrays(
          (len(self.local_devices),) + x.shape, self.stacked, copies)
    return jax.tree.map(stack, self.put_canonical(tree))

  def to_canonical(self, tree: Any) -> Any:
    def unstack(x):
      shards = {s.device: s.data for s in x.addressable_shards}
      copies = [shards[d].reshape(x.shape[1:]) for d in self.local_devices]
      # Each device's copy becomes that device's replica: no transfer between devices.
      return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, copies)
    return jax.tree.map(unstack, tree)

  def place_batch(self, batch: Batch) -> Batch:
    n = len(self.local_devices)
    return jax.tree.map(lambda x: jax.device_put(_split_rows(x, n), self.stacked), batch)

  def train_step_fn(self, step_fn: StepFn):
    step = jax.pmap(functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS,
                    devices=self.devices, donate_argnums=(0,))

    def first_metrics(out):
      state, metrics = out
      # The metrics were averaged on device: every copy is the same.
      return state, jax.tree.map(_first_copy, metrics)
    return CompiledStep(step, self.place_batch, first_metrics)

  def eval_step_fn(self, eval_fn):
    def gathered(state, batch):
      # Every device ends with the outputs of all rows, so each process can read them all.
      return jax.lax.all_gather(eval_fn(state, batch), AXIS, tiled=True)
    step = jax.pmap(gathered, axis_name=AXIS, devices=self.devices)

    def place(batch):
      return self.place_batch(jax.tree.map(
          lambda x: _process_rows(x, self.process_index, self.process_count), batch))
    return CompiledStep(step, place,
                        lambda out: jax.device_get(jax.tree.map(_first_copy, out)))


# ---------------------------------------------------------------------------------------------
# From the config.


def select_devices(num_devices: int, process_count: int) -> Tuple[jax.Device, ...]:
  """The first `num_devices` local devices of every process (-1: all), grouped by process."""
  local = jax.local_devices()
  if num_devices == -1:
    num_devices = len(local)
  if num_devices <= 0:
    raise ValueError(f"config.num_devices must be -1 (all local devices) or >= 1, got "
                     f"{num_devices}.")
  if num_devices > len(local):
    raise ValueError(
        f"config.num_devices={num_devices} but this process sees only {len(local)} "
        f"{local[0].platform} device(s) ({', '.join(str(d) for d in local)}). Set "
        f"--config.num_devices=-1 to use them all, or a smaller number.")
  return tuple(d for p in range(process_count)
               for d in jax.local_devices(process_index=p)[:num_devices])


def resolve_mode(mode: str, num_devices: int, process_count: int) -> str:
  """'auto' -> 'sharding' with more than one device in the run, 'single' otherwise."""
  if mode not in MODES:
    raise ValueError(f"Unknown config.parallel {mode!r}; choose one of {', '.join(MODES)}.")
  if mode == "auto":
    return "sharding" if num_devices * process_count > 1 else "single"
  if mode == "single" and (num_devices > 1 or process_count > 1):
    raise ValueError(
        f"config.parallel='single' runs on one device, but num_devices={num_devices} and "
        f"{process_count} process(es) were asked for; use 'sharding' or 'pmap', or "
        "--config.num_devices=1 in one process.")
  return mode


def from_config(config: ml_collections.ConfigDict) -> Parallel:
  """Joins the other processes if configured, picks the devices and checks the batch split.

  Call it first: jax.distributed must start before any computation, and bad settings should
  stop the run before data are prepared or anything is written.
  """
  mode = config.get("parallel", "auto")
  if mode not in MODES:
    raise ValueError(f"Unknown config.parallel {mode!r}; choose one of {', '.join(MODES)}.")
  initialize_distributed(config.get("distributed"))
  process_count = jax.process_count()
  requested = int(config.get("num_devices", -1))
  if mode == "single" and requested == -1:
    requested = 1
  devices = select_devices(requested, process_count)
  mode = resolve_mode(mode, len(devices) // process_count, process_count)
  par = {"single": Single, "pmap": Pmapped, "sharding": Sharded}[mode](devices)
  par.check_batch_size(int(config.batch_size))
  logging.info("Parallel: %s.", par.describe())
  return par
