"""Everything about several processes: the rank environment (whatever started us: plain `biomask
pretrain`, `torchrun`, the `deepspeed` launcher, or SLURM's `srun`), the process group, the collectives
the trainer uses (`all_sum`, `on_rank0`) and the stop signal all ranks agree on.

torch.distributed (and DeepSpeed) read five variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT. torchrun and the deepspeed launcher set them; srun sets SLURM_* instead, which DeepSpeed
does not read, so they are mapped here; a plain single process sets all five itself (with one
missing, DeepSpeed falls into MPI discovery and fails asking for mpi4py).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from biomask.errors import SCHEDULER_SIGNALS, BiomaskError, InputError

if TYPE_CHECKING:  # torch is imported where it is used: the pipeline runner reads RANK_VARS from here
    import datetime

    import torch

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # plain | torchrun | deepspeed | slurm | env (RANK and WORLD_SIZE set by hand)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def variables(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1", "rack[1-2]-n[01-02]") as host names, in
    scontrol's order, without scontrol. A name of several bracket groups is every combination (it
    was read as separate hosts, so "rack[1-2]-n[01-02]" started at a host named "rack1")."""
    items, depth, current = [], 0, ""
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    hosts: list[str] = []
    for item in filter(None, items):
        choices: list[list[str]] = []
        for part in re.split(r"(\[[^\]]*\])", item):
            if part.startswith("[") and part.endswith("]"):
                options: list[str] = []
                for span in part[1:-1].split(","):
                    lo, _, hi = span.partition("-")
                    options.extend(
                        [lo] if not hi else [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
                    )
                choices.append(options)
            elif part:
                choices.append([part])
        hosts.extend("".join(combination) for combination in itertools.product(*choices))
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """The first host of a job (`scontrol show hostnames` when available: it knows every syntax)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
            )
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


def _whole(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    """A rank variable as a whole number; one that is not is named (a traceback named none)."""
    value = env.get(name, default)
    try:
        return int(str(value).strip())
    except ValueError:
        raise InputError(
            f"the environment variable {name}={value!r} is not a whole number: set it to one, or unset it "
            "(a launcher sets the rank variables; one process needs none)"
        ) from None


def resolve_env(env: Mapping[str, str], local_rank_arg: int | None = None) -> DistEnv:
    """Work out the rank environment from the process environment (pure: does not modify it).

    Precedence: a launcher that set the variables itself (torchrun: TORCHELASTIC_RUN_ID; the deepspeed
    launcher: CROSS_RANK or --local_rank) > an srun task (SLURM_PROCID, SLURM_NTASKS: rank variables
    inherited from the submitting shell are stale there) > RANK and WORLD_SIZE set by hand > one process.
    """
    launcher = None
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif local_rank_arg is not None or "CROSS_RANK" in env:
        launcher = "deepspeed"
    if launcher is None and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = _whole(env, "SLURM_JOB_ID", "0") if env.get("SLURM_JOB_ID") else 0
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        )
        return DistEnv(
            rank=_whole(env, "SLURM_PROCID"),
            world_size=_whole(env, "SLURM_NTASKS"),
            local_rank=_whole(env, "SLURM_LOCALID", "0"),
            master_addr=env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "127.0.0.1"),
            # Every task derives the same port from the job id (no communication needed).
            master_port=_whole(env, "MASTER_PORT") if env.get("MASTER_PORT") else 15000 + job % 20000,
            launcher="slurm",
        )
    if "RANK" in env and "WORLD_SIZE" in env:
        local = env.get("LOCAL_RANK", str(local_rank_arg) if local_rank_arg is not None else "0")
        return DistEnv(
            rank=_whole(env, "RANK"),
            world_size=_whole(env, "WORLD_SIZE"),
            local_rank=_whole({"LOCAL_RANK": local}, "LOCAL_RANK"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_whole(env, "MASTER_PORT", "29500") if env.get("MASTER_PORT") else 29500,
            launcher=launcher or "env",
        )
    port = _whole(env, "MASTER_PORT") if env.get("MASTER_PORT") else free_port()
    return DistEnv(0, 1, 0, "127.0.0.1", port, "plain")


def setup_env(local_rank_arg: int | None = None) -> DistEnv:
    """Resolve the rank environment and export the five variables torch.distributed reads."""
    dist_env = resolve_env(os.environ, local_rank_arg)
    os.environ.update(dist_env.variables())
    from biomask.training.accelerator import accelerator

    accelerator()  # torch and DeepSpeed on the same device (DS_ACCELERATOR exported)
    return dist_env


def import_deepspeed() -> Any:
    """`import deepspeed`, without the `import mlflow` its autotuner runs when MLflow is installed:
    about 2 s in every training process (a pipeline starts dozens), for a tool biomask never runs.
    biomask's own MLflow tracker imports mlflow itself when a run reports to it."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed
    else:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    _reopen_closed_log_streams(deepspeed.utils.logger)
    return deepspeed


def _reopen_closed_log_streams(logger: Any) -> None:
    """DeepSpeed's logger writes to the sys.stdout of the moment it was imported: imported inside a
    redirect (contextlib.redirect_stdout, a notebook cell's or a test's capture), each warning later
    printed a "--- Logging error ---" traceback about a closed file. Such a handler writes to today's."""
    import contextlib
    import logging
    import sys

    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            with handler.lock or contextlib.nullcontext():  # not setStream: it flushes the closed stream
                handler.stream = sys.stdout


@contextlib.contextmanager
def _silenced_descriptors() -> Iterator[None]:
    """File descriptors 1 and 2, and those of sys.stdout / sys.stderr where they are others (Jupyter's
    kernel), pointed at /dev/null for the block: what subprocesses and C code write there is dropped.
    Each is put back as it was, its close-on-exec flag too; one thread at a time (a second thread's
    block took the first's /dev/null for the original and put it back last)."""
    with _DESCRIPTORS:
        targets = {1, 2}
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, OSError, ValueError):
                stream.flush()  # what was written before goes where it was going
                targets.add(stream.fileno())
        saved: dict[int, tuple[int, bool]] = {}
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            yield
            return
        try:
            for fd in sorted(targets):
                with contextlib.suppress(OSError):
                    inheritable = os.get_inheritable(fd)
                    saved[fd] = (os.dup(fd), inheritable)
                    os.dup2(null, fd)
            yield
        finally:
            for fd, (copy, inheritable) in saved.items():
                with contextlib.suppress(OSError):
                    os.dup2(copy, fd, inheritable=inheritable)
                os.close(copy)
            os.close(null)


_DESCRIPTORS = threading.Lock()


@contextlib.contextmanager
def torch_linear_kept() -> Iterator[None]:
    """A ZeRO-3 engine swaps torch.nn.functional.linear for DeepSpeed's own "until manually reset":
    the caller's torch code (a notebook's next model) gets torch's back when the block ends."""
    import torch

    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def _forget_destroyed_groups(deepspeed: Any, world_size: int = 1) -> None:
    """DeepSpeed keeps its copy of the world group between runs; a caller that destroyed the process
    group with torch's `destroy_process_group` (ordinary teardown in other torch code; DeepSpeed
    forgets its copies only through its own) left it pointing at a group torch no longer knows, and the
    next engine failed with "Group ... is not registered". One process: forgotten, DeepSpeed makes a
    new one. Several (torchrun): the launcher's rendezvous is not made twice (gloo waited, then said
    the other processes were lost), so the run is refused with what to do."""
    import torch

    groups = getattr(getattr(deepspeed, "utils", None), "groups", None)
    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is None:
        return
    try:
        torch.distributed.get_process_group_ranks(cached)  # raises for a group torch does not know
        return
    except (KeyError, ValueError, RuntimeError):  # torch 2.13: KeyError; others ValueError
        pass
    if world_size > 1:
        raise BiomaskError(
            "the process group an earlier run of these processes started was destroyed "
            "(torch.distributed.destroy_process_group); several processes cannot start a new one in "
            "the same launch: run the next training in a new launch (torchrun again), or leave the "
            "group to biomask, which keeps it for the next run"
        )
    release = getattr(groups, "_release_process_group_references", None)
    if callable(release):
        release(None)  # every group DeepSpeed cached: all were destroyed with the world
    else:
        groups._WORLD_GROUP = None


def _groups_wait(timeout: datetime.timedelta) -> None:
    """Every process group made from now on waits `timeout` for its peers, not only the world group.
    ZeRO runs its collectives on groups DeepSpeed makes with torch's `new_group`, which takes torch's
    own default (30 minutes) rather than the world group's: a peer that hung without dying (a node
    stopped, a process frozen) held the others for 30 minutes, silently, whatever
    deepspeed.timeout_minutes said. torch reads the default when a group is made. Only in a launched
    process of several, which ends with its run."""
    import datetime

    import torch.distributed.distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, timeout)


def init_process_group(dist_env: DistEnv, timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); once per process.
    `timeout_minutes`: how long a collective (and the start-up rendezvous) waits for the other
    processes before it gives up on them (`deepspeed.timeout_minutes`)."""
    import datetime

    import torch

    deepspeed = import_deepspeed()

    # The shared-memory comm op serves CPU inference only, and would JIT-compile (~1 min) at init.
    # Reading the table probes every op once by compiling test programs; their linker errors ("cannot
    # find -laio") reached a notebook's cell output, where the descriptor DeepSpeed silences is not
    # the one the kernel captures: both are pointed at /dev/null meanwhile.
    with _silenced_descriptors():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _forget_destroyed_groups(deepspeed, dist_env.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    from biomask.training.accelerator import accelerator

    cuda = accelerator() == "cuda"
    if cuda:
        torch.cuda.set_device(dist_env.local_rank)
    if dist_env.world_size == 1:
        # One process needs no rendezvous: an in-memory store instead of a TCP port, which another
        # process can take between our free_port() and DeepSpeed's bind (seen: EADDRINUSE in CI).
        # DeepSpeed adopts a process group that is already initialised.
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if dist_env.world_size > 1:
        _groups_wait(timeout)
    deepspeed.init_distributed(
        dist_backend="nccl" if cuda else "gloo",
        auto_mpi_discovery=False,
        verbose=False,
        timeout=timeout,
        rank=dist_env.rank,
        world_size=dist_env.world_size,
    )
    # Why: a process that leaves its NCCL group to the interpreter's teardown can hang there — seen
    # on an H200: `biomask evaluate` with ZeRO-2 fine-tuning wrote its results, then never exited
    atexit.unregister(_destroy_process_group)  # once, however many runs started a group
    atexit.register(_destroy_process_group)
    global _own_world
    _own_world = torch.distributed.group.WORLD


_own_world: Any = None  # the world group biomask started (a caller's own group is never destroyed)


def release_own_group() -> None:
    """The one-process group a library call started, given back when it returns: other torch code in
    the caller's process reads an initialised group as a distributed run (Lightning, which scvi-tools
    trains with, warned of a "distributed setting" at every epoch after `fit_cells`). The next run
    starts a new one (`_forget_destroyed_groups`). A group the caller started, or a launcher's
    (several processes), is left as it is."""
    global _own_world
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.group.WORLD is not _own_world:
        return  # none, or the caller's (theirs, or one they started after destroying ours)
    if torch.distributed.get_world_size() > 1:
        return
    _destroy_process_group()
    _forget_destroyed_groups(import_deepspeed(), 1)
    _own_world = None


def started_process_group() -> bool:
    """Whether this process initialised a process group (its end then goes through leave_process)."""
    return _own_world is not None


def leave_process(code: int) -> None:
    """End a process that started a process group: exit handlers run, the interpreter's teardown does not.

    Why: after the exit handlers (the group destroyed, logs flushed), the interpreter frees what is left
    (DeepSpeed engines in reference cycles, the backend's threads and the tensors they hold). A thread
    that needs the GIL then is ended by CPython mid-destructor, and the C++ runtime aborts: seen once in
    CI, `deepspeed --num_gpus 2 biomask pretrain` (ZeRO-3, gloo) wrote everything, printed "terminate
    called without an active exception", and the launcher reported exit 250 (SIGABRT). Every output is
    on disk by then, so nothing the teardown would do is needed. A process without a group exits as usual.
    """
    if not started_process_group():
        raise SystemExit(code)
    import sys

    atexit._run_exitfuncs()  # CPython's own exit handlers, run here while the interpreter is whole
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _destroy_process_group() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway: a failed teardown must not mask the exit code
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------ collectives and signals


class StopSignal:
    """A scheduler's signal (SCHEDULER_SIGNALS), SIGINT (Ctrl-C) and SIGHUP (the terminal closed) set a
    flag; the loop checkpoints at the end of the current step and exits 75, so the same command
    resumes. A second Ctrl-C stops at once.
    Under torchrun or the deepspeed launcher, the launcher's own shutdown on Ctrl-C (SIGTERM to its
    workers, SIGKILL after a grace period) decides how far that gets."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal
        self.interrupted = False  # Ctrl-C seen (a second one stops at once, whatever came between)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """The handlers, from the main thread. Training started from another thread (a notebook's
        background thread, a web service's worker) installs none: Python delivers signals to the main
        thread alone, whose handlers stay the caller's, and `signal.signal` would refuse there."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (*SCHEDULER_SIGNALS, signal.SIGINT, signal.SIGHUP):
            if sig != signal.SIGTERM and signal.getsignal(sig) is signal.SIG_IGN:
                # started ignoring it (a script's background job, nohup; a job script's `trap '' USR1`:
                # SGE's -notify warns of a suspend with it, which must not end the run): keep it so
                continue
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # asked twice: no checkpoint
            self.interrupted = True
            # os.write, not logging: a handler may run while the logging lock is held
            os.write(
                2,
                b"\nbiomask: interrupted: checkpointing at the end of this step (Ctrl-C again to stop now)\n",
            )
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        """The signal received, by name (SIGINT, ...), or 'on another rank'."""
        return signal.Signals(self.received).name if self.received is not None else "on another rank"

    def restore(self) -> None:
        """The handlers from before `install` (those `ignore_from_now` set aside stay ignored)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def ignore_from_now(self) -> None:
        """After the requeue checkpoint of a process that then exits with 75 (the `biomask` command;
        `Requeue.ends_process`; a Python caller gets every handler back at `restore`). A further SIGTERM or
        SIGUSR1 — e.g. srun terminating the step because another rank exited first — must not turn
        that into "killed by a signal", which would keep the job script from requeueing. Ctrl-C gets
        its own handler back at `restore` (in a notebook the kernel goes on and must stay
        interruptible)."""
        for sig in (*SCHEDULER_SIGNALS, signal.SIGHUP):
            if sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)
                del self._previous[sig]

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """True on every rank if any rank got a signal (ranks must checkpoint together)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def all_sum(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """The sums over ranks (float64, so token counts stay exact)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def on_rank0(fn: Callable[[], Any], dist_env: DistEnv) -> Any:
    """Run `fn` on rank 0 only; every rank gets its result, or raises its error (so no rank is left
    waiting in a collective while rank 0 reports bad input)."""
    result: list[Any] = [None]
    if dist_env.is_main:
        try:
            result = [fn()]
        except BiomaskError as exc:
            result = [exc]
    if dist_env.world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], BaseException):
        if not dist_env.is_main:
            result[0].from_rank0 = True  # type: ignore[attr-defined]  # rank 0 says it: once, not N times
        raise result[0]
    return result[0]
