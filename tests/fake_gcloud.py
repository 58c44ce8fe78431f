"""A stand-in for the `gcloud` commands tpu/pod uses, for tests without a cloud or a TPU.

Every call is appended to ROOT/calls.jsonl (ROOT = $FAKE_GCLOUD_ROOT). Slices move through the
states the real service reports, as ROOT/scenario.json says: `capacity_errors` creation requests
fail with RESOURCE_EXHAUSTED first; a queued resource is WAITING_FOR_RESOURCES, then PROVISIONING
for `provision_polls` describes each, then ACTIVE (`fail_first`: the first one goes FAILED instead).
A TPU VM's workers are directories ROOT/vms/NODE/worker-I (their home); `ssh --worker=all` really
runs the command in each, as its own process, with the environment a TPU VM's jax would derive
from the TPU metadata: process id and count and a coordinator address (127.0.0.1 here), and
`workers_devices` fake CPU devices each. The VM image has the locked Python stack preinstalled
(`image_venv`), as a custom TPU image would. Deleting a slice kills its processes and wipes its
disks. `python fake_gcloud.py preempt NODE` plays a spot preemption: SIGTERM to every worker's run,
up to 30 s of grace, SIGKILL, then the slice is SUSPENDED (queued) or PREEMPTED (TPU VM).
`describe_errors` / `delete_errors` make that many describe / delete calls (counted over the whole
scenario) fail first as the real service does when it cannot answer: exit 1 with gcloud's error,
no state change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ["FAKE_GCLOUD_ROOT"])
STATE = ROOT / "state.json"


def load() -> dict:
  return (
    json.loads(STATE.read_text()) if STATE.exists() else {"queued": {}, "nodes": {}, "requests": 0}
  )


def store(state: dict):
  partial = STATE.with_suffix(".partial")
  partial.write_text(json.dumps(state, indent=1))
  os.replace(partial, STATE)


@contextlib.contextmanager
def state_lock():
  """One gcloud call at a time reads and writes the state (babysit polls while a test preempts)."""
  with (ROOT / "state.lock").open("w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def scenario() -> dict:
  path = ROOT / "scenario.json"
  return json.loads(path.read_text()) if path.exists() else {}


def flag(args: list[str], name: str, default=None):
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}":
      return True
  return default


def positional(args: list[str]) -> list[str]:
  return [a for a in args if not a.startswith("--")]


def fail(message: str, code: int = 1):
  print(f"ERROR: {message}", file=sys.stderr)
  sys.exit(code)


def node_names(name: str, args: list[str]) -> list[str]:
  count = flag(args, "node-count")
  return [f"{name}-{i}" for i in range(int(count))] if count else [name]


def worker_homes(node: str) -> list[Path]:
  return sorted((ROOT / "vms" / node).glob("worker-*"))


def make_vm(node: str):
  plan = scenario()
  source_repo = Path(plan["repo"])
  for i in range(plan.get("workers", 2)):
    home = ROOT / "vms" / node / f"worker-{i}"
    venv = home / "celerity_jax" / ".venv"
    venv.mkdir(parents=True)
    image = Path(plan["image_venv"])
    shutil.copy(image / "pyvenv.cfg", venv / "pyvenv.cfg")
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(image / "bin" / "python")
    (venv / "lib").symlink_to(image / "lib")
    # what tpu/pod copies is `git archive HEAD`: stamp the committed files, not the working tree's
    lock = b"".join(
      subprocess.run(
        ["git", "-C", str(source_repo), "show", f"HEAD:{name}"], capture_output=True, check=True
      ).stdout
      for name in ("requirements.lock", "pyproject.toml")
    )
    (venv / "celerity_stamp").write_text(hashlib.sha256(lock).hexdigest()[:16] + "\n")


def kill_runs(node: str, sig: int, grace_s: float):
  pids = []
  for home in worker_homes(node):
    try:
      pids.append(int((home / "celerity_logs" / "pid").read_text()))
    except (OSError, ValueError):
      pass
  for pid in pids:
    try:
      os.kill(pid, sig)
    except ProcessLookupError:
      pass
  deadline = time.time() + grace_s
  for pid in pids:
    while time.time() < deadline:
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        break
      time.sleep(0.1)
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def queued_resources(verb: str, args: list[str]):
  state, name = load(), positional(args)[0]
  if verb == "create":
    state["requests"] += 1
    if state["requests"] <= scenario().get("capacity_errors", 0):
      store(state)
      fail(
        "(gcloud.compute.tpus.queued-resources.create) RESOURCE_EXHAUSTED: There is no more "
        "capacity in the zone"
      )
    if name in state["queued"]:
      fail(f"ALREADY_EXISTS: queued resource {name}")
    nodes = node_names(name, args)
    state["queued"][name] = {
      "state": "WAITING_FOR_RESOURCES",
      "polls": 0,
      "nodes": nodes,
      "fails": state["requests"] == 1 and scenario().get("fail_first", False),
    }
    for node in nodes:
      state["nodes"][node] = {"state": "CREATING", "owner": name}
    store(state)
    print(f"Create request issued for: [{name}]")
  elif verb == "describe":
    qr = state["queued"].get(name)
    if qr is None:
      fail(f"NOT_FOUND: queued resource {name}")
    qr["polls"] += 1
    if qr["state"] in ("WAITING_FOR_RESOURCES", "PROVISIONING") and (
      qr["polls"] > scenario().get("provision_polls", 1)
    ):
      qr["polls"] = 0
      if qr["state"] == "WAITING_FOR_RESOURCES":
        qr["state"] = "PROVISIONING"
      elif qr["fails"]:
        qr["state"] = "FAILED"
      else:
        qr["state"] = "ACTIVE"
        for node in qr["nodes"]:
          state["nodes"][node]["state"] = "READY"
          make_vm(node)
    store(state)
    print(qr["state"])
  elif verb == "delete":
    qr = state["queued"].pop(name, None)
    if qr is None:
      fail(f"NOT_FOUND: queued resource {name}")
    if qr["state"] == "ACTIVE" and "--force" not in args:
      fail("FAILED_PRECONDITION: delete the nodes first or pass --force")
    for node in qr["nodes"]:
      delete_node(state, node)
    store(state)
    print(f"Deleted queued resource [{name}]")


def delete_node(state: dict, node: str):
  kill_runs(node, signal.SIGKILL, 0)
  shutil.rmtree(ROOT / "vms" / node, ignore_errors=True)
  state["nodes"].pop(node, None)


def tpu_vm(verb: str, args: list[str]):
  state, names = load(), positional(args)
  if verb == "create":
    state["requests"] += 1
    store(state)
    if state["requests"] <= scenario().get("capacity_errors", 0):
      fail(
        "(gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is no more capacity in "
        'the zone "z"; you can try in another zone where Cloud TPU Nodes are offered'
      )
    state["nodes"][names[0]] = {"state": "READY", "owner": None}
    make_vm(names[0])
    store(state)
  elif verb == "describe":
    node = state["nodes"].get(names[0])
    if node is None:
      fail(f"NOT_FOUND: node {names[0]}")
    print(node["state"])
  elif verb == "delete":
    if names[0] not in state["nodes"]:
      fail(f"NOT_FOUND: node {names[0]}")
    delete_node(state, names[0])
    store(state)
  elif verb == "scp":
    source, target = names[0], names[1]
    node, _, dest = target.partition(":")
    for home in worker_homes(node):
      shutil.copy(source, home / dest)
  elif verb == "ssh":
    ssh(state, names[0], flag(args, "command"))


def ssh(state: dict, node: str, command: str):
  if state["nodes"].get(node, {}).get("state") != "READY":
    fail(f"(gcloud.compute.tpus.tpu-vm.ssh) node {node} is not READY", 255)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  homes = worker_homes(node)
  procs = []
  for i, home in enumerate(homes):
    env = {
      **os.environ,
      "HOME": str(home),
      "TPU_WORKER_ID": str(i),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={scenario().get('workers_devices', 4)}",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(len(homes)),
      "JAX_PROCESS_ID": str(i),
    }
    procs.append(
      subprocess.Popen(
        ["bash", "-c", command],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  codes = []
  for proc in procs:
    out, _ = proc.communicate()
    sys.stdout.write(out)
    codes.append(proc.returncode)
  sys.exit(max(codes))


def preempt(node: str):
  """As GCE does it: the node leaves READY (STOPPING) as its processes get SIGTERM and a grace
  period, then shows PREEMPTED."""
  with state_lock():
    state = load()
    state["nodes"][node]["state"] = "STOPPING"
    store(state)
  kill_runs(node, signal.SIGTERM, 30)
  with state_lock():
    mark_preempted(node)


def mark_preempted(node: str):
  state = load()
  owner = state["nodes"][node]["owner"]
  state["nodes"][node]["state"] = "PREEMPTED"
  if owner:
    state["queued"][owner]["state"] = "SUSPENDED"
  store(state)


def transient_error(group: str, verb: str):
  """The scenario's next `describe_errors` / `delete_errors` calls fail as an unreachable API."""
  key = f"{verb}_errors"
  if verb not in ("describe", "delete") or not scenario().get(key):
    return
  with state_lock():
    state = load()
    state[key] = state.get(key, 0) + 1
    store(state)
  if state[key] <= scenario()[key]:
    fail(
      f"(gcloud.compute.tpus.{group}.{verb}) There was a problem refreshing your current auth "
      f"tokens: ('Connection aborted.', RemoteDisconnected('Remote end closed connection "
      f"without response')) UNAVAILABLE"
    )


def main(argv: list[str]):
  if argv[:1] == ["preempt"]:
    return preempt(argv[1])
  with (ROOT / "calls.jsonl").open("a") as log:
    log.write(json.dumps(argv) + "\n")
  args = argv[1:] if argv[:1] == ["alpha"] else argv
  if args[:2] != ["compute", "tpus"] or len(args) < 4:
    fail(f"fake gcloud does not know: {' '.join(argv)}", 2)
  group, verb, rest = args[2], args[3], args[4:]
  if group not in ("queued-resources", "tpu-vm"):
    fail(f"fake gcloud does not know: {' '.join(argv)}", 2)
  transient_error(group, verb)
  if group == "tpu-vm" and verb == "ssh":  # runs for minutes: reads the state only
    tpu_vm(verb, rest)
    return
  with state_lock():
    (queued_resources if group == "queued-resources" else tpu_vm)(verb, rest)


if __name__ == "__main__":
  main(sys.argv[1:])
