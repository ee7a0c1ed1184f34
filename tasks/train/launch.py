"""Build the DeepSpeed config and the launch command, run the ranks, stream their output, explain failures."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tasks.train.config import TrainConfig

log = logging.getLogger("kiln.train")


class TrainLaunchError(RuntimeError):
    """Training could not start, or a rank failed; the message names the rank and its error."""


# Callers in the same process that watch a run's events as they stream, by the run's output directory
# (an HPO trial reporting validation values to its study). An observer that raises stops the run: the
# launcher and its ranks are killed and the exception goes on up (UnitStopped: stopped on purpose).
_observers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
_observers_lock = threading.Lock()


@contextlib.contextmanager
def observing(output_dir: str, observer: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Hand every event of the run that writes `output_dir` to `observer` while the block runs."""
    with _observers_lock:
        _observers.setdefault(output_dir, []).append(observer)
    try:
        yield
    finally:
        with _observers_lock:
            _observers[output_dir].remove(observer)
            if not _observers[output_dir]:
                del _observers[output_dir]


# The launchers running in this process, by their run's output directory, and why a caller asked one to
# stop (a flow run cancelled in the UI while `kiln run` runs it in-process: no signal reaches the process).
_live: dict[str, subprocess.Popen] = {}
_stop_requests: dict[str, str] = {}
_live_lock = threading.Lock()


def request_stop(output_dir: str, reason: str) -> bool:
    """Stop the run that writes `output_dir`: its launcher and ranks get SIGTERM (its checkpoints stay for
    a rerun to resume from) and `run` raises UnitStopped(reason). False when no such run is live here."""
    with _live_lock:
        proc = _live.get(output_dir)
        if proc is None or proc.poll() is not None:
            return False
        _stop_requests[output_dir] = reason
    log.warning("stopping the run writing %s: %s", output_dir, reason)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    return True


def _output_dir(run_json: str) -> str | None:
    """The run's output directory (the key request_stop finds it by); None when the spec has none."""
    try:
        with open(run_json) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return None
    return spec.get("output_dir") if isinstance(spec, dict) else None


def notify(output_dir: str, event: dict[str, Any]) -> None:
    with _observers_lock:
        observers = list(_observers.get(output_dir, ()))
    for observer in observers:
        observer(event)


def resolve_precision(cfg: TrainConfig) -> str:
    p = cfg.deepspeed.precision
    if cfg.launch.device == "cpu":
        if p in ("bf16", "fp16"):
            raise TrainLaunchError(f"train.deepspeed.precision: {p} needs launch.device: gpu; CPU ranks train in fp32")
        return "fp32"
    if p != "auto":
        return p
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    precision = resolve_precision(cfg)
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage >= 2:
        zero.update(overlap_comm=cfg.launch.device == "gpu", contiguous_gradients=True)
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.deepspeed.offload_optimizer == "cpu":
        if cfg.deepspeed.zero_stage == 0:
            raise TrainLaunchError("train.deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.deepspeed.offload_params == "cpu":
        if cfg.deepspeed.zero_stage != 3:
            raise TrainLaunchError("train.deepspeed.offload_params: needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if cfg.launch.device == "gpu":  # DeepSpeed's fused (or CPU-offload) Adam; on CPU the worker uses torch AdamW
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
            },
        }
    return ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hosts(hostfile: str) -> list[tuple[str, int]]:
    hosts = []
    with open(hostfile) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
            if not m:
                raise TrainLaunchError(f"train.launch.hostfile: {hostfile}: bad line {line!r} (want 'host slots=N')")
            hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise TrainLaunchError(f"train.launch.hostfile: {hostfile} lists no hosts")
    return hosts


def world_size(cfg: TrainConfig) -> int:
    if cfg.launch.hostfile:
        return sum(slots for _, slots in _hosts(cfg.launch.hostfile))
    return cfg.launch.procs_per_node


def check_hardware(cfg: TrainConfig) -> None:
    """Refuse, before anything starts, a launch this machine cannot do."""
    if cfg.launch.hostfile and not os.path.exists(cfg.launch.hostfile):
        raise TrainLaunchError(f"train.launch.hostfile: no such file: {cfg.launch.hostfile}")
    devices = cfg.launch.devices
    if cfg.launch.device != "gpu":
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if devices and cores and not set(devices) <= set(cores):
            raise TrainLaunchError(
                f"train.launch.devices: cores {sorted(set(devices) - set(cores))} are not available here "
                f"(this process may use cores {cores})"
            )
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise TrainLaunchError(
            "train.launch.device: gpu, but this machine has no CUDA GPU visible to torch "
            f"(torch {torch.__version__}; a CPU build cannot use GPUs). "
            "Use launch.device: cpu, or install a CUDA torch."
        )
    if devices and max(devices) >= n:
        raise TrainLaunchError(f"train.launch.devices: {devices} asked, this machine has GPUs 0..{n - 1}")
    usable = len(devices) if devices else n
    if not cfg.launch.hostfile and cfg.launch.procs_per_node > usable:
        raise TrainLaunchError(
            f"train.launch.procs_per_node: {cfg.launch.procs_per_node} ranks asked, {usable} GPU(s) "
            + ("in train.launch.devices" if devices else "here")
        )


def command(cfg: TrainConfig, run_json: str, module: str = "tasks.train.worker") -> tuple[list[str], dict[str, str]]:
    """The launch: torchrun on this node, or DeepSpeed's launcher over a hostfile, of `module` (the
    training worker; the RL worker is another module of the same launch)."""
    env = dict(os.environ)
    port = cfg.launch.master_port or _free_port()
    worker = ["-m", module, "--spec", run_json]
    if cfg.launch.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    elif cfg.launch.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in cfg.launch.devices)
    if cfg.launch.hostfile:  # several nodes: DeepSpeed's launcher (pdsh/ssh) starts torch ranks on each host
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            cfg.launch.hostfile,
            "--master_addr",
            cfg.launch.master_addr,
            "--master_port",
            str(port),
            "--module",
            *worker[1:2],
            *worker[2:],
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(cfg.launch.procs_per_node),
            "--master_addr",
            cfg.launch.master_addr,
            "--master_port",
            str(port),
            *worker,
        ]
    return cmd, env


_RANK_LINE = re.compile(r"^\s*rank\s*:\s*(\d+)")
_EXIT_LINE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """End this process when the process that started it ends, however that ends (SIGKILL included):
    Linux's parent-death signal, else a watchdog thread on the parent's pid. The launcher runs it in
    torchrun before exec, every rank at start-up: a killed `kiln run` takes its launcher and ranks
    with it instead of leaving them training into a staging directory a rerun will use."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(sig), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
                if os.getppid() != parent:  # the parent died before the signal was armed
                    os._exit(128 + int(sig))
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()


def _launcher_preexec(cores: list[int] | None = None) -> None:  # in the child, between fork and exec
    os.setsid()  # its own process group: the launcher and its ranks are stopped together
    die_with_parent()
    if cores:  # CPU ranks on these cores only (their children inherit it): trials side by side share a machine
        os.sched_setaffinity(0, cores)


def run(
    cfg: TrainConfig,
    run_json: str,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    cwd: str | None = None,
    keep_fds: tuple[int, ...] = (),
    module: str = "tasks.train.worker",
) -> list[dict[str, Any]]:
    """Start the ranks and wait. Every output line goes to the `kiln.train` logger; JSON event lines are
    also handed to `on_event`. Raises TrainLaunchError naming the failing rank and its error. `keep_fds`
    are passed on to the launcher (the unit's lock: it is held for as long as the launcher lives)."""
    cmd, env = command(cfg, run_json, module)
    log.info("launching %d rank(s): %s", world_size(cfg), " ".join(cmd))
    events: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    dead: dict[int, int] = {}
    tail: collections.deque[str] = collections.deque(maxlen=15)
    current_rank: int | None = None
    root_rank: int | None = None
    in_root_cause = False
    output_dir = _output_dir(run_json)
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=functools.partial(
            _launcher_preexec, cfg.launch.devices if cfg.launch.device == "cpu" and not cfg.launch.hostfile else None
        ),
        pass_fds=tuple(fd for fd in keep_fds if fd is not None),
    )
    if output_dir:
        with _live_lock:
            _live[output_dir] = proc
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            for event in _events_in(line):
                (errors if event["kiln"] == "error" else events).append(event)
                if on_event:
                    on_event(event)
            if "Root Cause" in line:  # torchrun's summary names the first failure after this line
                in_root_cause = True
            m = _RANK_LINE.match(line)
            if m:
                current_rank = int(m.group(1))
                if in_root_cause and root_rank is None:
                    root_rank = current_rank
            m = _EXIT_LINE.match(line)
            if m and current_rank is not None:
                dead[current_rank] = int(m.group(1))
            log.info("%s", line)
            tail.append(line)
        code = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        with _live_lock:
            _live.pop(output_dir, None)
            stopped = _stop_requests.pop(output_dir, None)
    if stopped is not None and code != 0:
        from tasks.stage import UnitStopped

        _kill_group(proc)  # the ranks too, should one have outlived its launcher
        raise UnitStopped(stopped)
    if code != 0:
        finished = {e.get("rank") for e in events if e.get("kiln") == "finished"}
        if not errors and finished >= set(range(world_size(cfg))):
            # Every rank reported its work written and its process group closed before it died: the
            # outputs are complete (a known DeepSpeed teardown abort), so the run stands.
            log.warning(
                "the launcher exited with code %d after every rank had finished and saved; "
                "treating the run as complete (a rank died during interpreter teardown)",
                code,
            )
            return events
        raise TrainLaunchError(_explain(code, errors, dead, list(tail), root_rank))
    return events


_DECODER = json.JSONDecoder()


def _events_in(line: str) -> list[dict[str, Any]]:
    """The worker's JSON events in one output line. Ranks write each event with one write(), but a
    rank's other output (a warning without its newline yet) can still precede an event on the same
    line, and events longer than the pipe's atomic size can run into each other: every `{"kiln"` is
    tried."""
    found: list[dict[str, Any]] = []
    start = line.find('{"kiln"')
    while start != -1:
        try:
            event, end = _DECODER.raw_decode(line, start)
        except json.JSONDecodeError:
            end = start + 1
        else:
            if isinstance(event, dict) and "kiln" in event:
                found.append(event)
        start = line.find('{"kiln"', end)
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _explain(
    code: int, errors: list[dict[str, Any]], dead: dict[int, int], tail: list[str], root_rank: int | None = None
) -> str:
    # A rank killed by a signal is the cause; the others then fail on broken collectives or are stopped
    # by torchrun with SIGTERM, so the root cause (or a non-SIGTERM death) comes first. A rank that
    # reported its error and then died on the way out (a C++ thread's abort at exit) is explained by its
    # error, and once a rank reported one, a SIGTERM is torchrun stopping the others.
    reported = {e.get("rank") for e in errors}
    causes = {r: c for r, c in dead.items() if r not in reported and not (errors and c == -signal.SIGTERM)}
    order = sorted(causes.items(), key=lambda kv: (kv[0] != root_rank, kv[1] == -signal.SIGTERM, kv[0]))
    if order and order[0][1] < 0:
        rank, exitcode = order[0]
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"training failed: rank {rank} was killed by {name}; rerun to resume from the last checkpoint"
    if errors:
        nan = [e for e in errors if e.get("kind") == "non_finite_loss"]
        first = min(nan or errors, key=lambda e: e.get("rank", 0))
        verb = "stopped" if nan else "failed"
        return f"training {verb} on rank {first.get('rank')}: {first['error']}"
    for rank, exitcode in sorted(dead.items()):
        return f"training failed: rank {rank} exited with code {exitcode}; its last lines:\n" + "\n".join(tail)
    return f"training failed: the launcher exited with code {code}; its last lines:\n" + "\n".join(tail)
