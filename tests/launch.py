"""Run the project's scripts and two-rank worlds from the tests, in fresh processes, fast and bounded.

A plain `python pretrain.py ...` spends about two seconds of a toy run importing torch. The tests start
hundreds of such runs, so each one is forked instead from a server process that imported torch, numpy,
and PIL once (Python's "forkserver"; it has no threads, so forking it is safe). The child
runs the script as `__main__` with its own command line, environment, working directory, stdout,
stderr and exit status: what the script does is what `python script.py ...` does.

Every run is bounded: one still going after `timeout` seconds (240 by default; the longest toy run in
the tests takes under a minute on two busy cores) is killed with its process group and fails its test
with the output it had printed, instead of stalling the suite.
"""
import multiprocessing
import multiprocessing.connection
import os
import runpy
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Third-party modules (and this one, whose _child each run starts in). The library itself, cheap to import,
# is imported afresh by each run, so what it reads from the environment at import time (EMU_ATTENTION) is
# the run's own. torch._dynamo is imported on first use by FSDP and by the towers' meta-device build.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "numpy", "PIL.Image", "safetensors.torch", "tokenizers", "pytest", "launch"]

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


@dataclass
class Finished:
    """What a finished run left: like subprocess.CompletedProcess."""
    argv: list
    returncode: int
    stdout: str
    stderr: str


def _exit_code(e):
    """The exit status Python gives a SystemExit, printing its message as the interpreter would."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _child(argv, env, cwd, out_path, err_path):
    """In the forked process: become `python *argv`, then exit with its status."""
    os.setpgid(0, 0)  # a group of its own, so a timeout kills what it started too (torchrun's ranks)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.stdin = open(os.devnull)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch
    if "OMP_NUM_THREADS" in env:  # read by OpenMP when torch loaded, in the server: apply it here
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # the import path `python` would have: the script's folder (or, for -m, the working directory) first,
    # and not the tests' additions
    sys.path[:] = [p for p in sys.path if p not in (ROOT, os.path.dirname(os.path.abspath(__file__)))]
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.join(cwd, argv[0])
            sys.argv = [script, *argv[1:]]
            sys.path.insert(0, os.path.dirname(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)  # to multiprocessing, which runs its finalizers (a DataLoader's queues) and exits


def _kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.join()


def script(*argv, timeout=240, env=None, cwd=ROOT):
    """Run `python *argv` (a script path relative to `cwd`, or "-m", module, ...) and return a Finished.
    `env` adds to the test process's environment; torch uses one thread unless it says otherwise."""
    argv = [str(a) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = _CONTEXT.Process(target=_child, args=(argv, env, str(cwd), out, err))  # not daemonic: it may start workers
        process.start()
        process.join(timeout)
        timed_out = process.exitcode is None
        if timed_out:
            _kill_group(process)
        result = Finished(argv, process.exitcode, open(out, errors="replace").read(), open(err, errors="replace").read())
    if timed_out:
        pytest.fail(f"python {' '.join(argv)}: still running after {timeout} s, killed:\n"
                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}", pytrace=False)
    return result


def run(*argv, timeout=240, env=None):
    """Run a script that must succeed; its stdout. A failure fails the test with the script's output."""
    result = script(*argv, timeout=timeout, env=env)
    assert result.returncode == 0, f"{argv[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


# ----------------------------------------------------------------------------------------------------
# two ranks over gloo, in-process functions

def _rank(rank, port, fn, args, errors):
    import torch
    import torch.distributed as dist

    from emu.training.dist import World, close_world
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = World(rank, 2, torch.device("cpu"))
    try:
        fn(world, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        os._exit(1)  # no teardown: the other rank may be waiting in a collective that never comes
    close_world(world)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_ranks(fn, *args, timeout=120):
    """Run fn(world, *args) in two processes joined over gloo (fn must be importable by name); a failure
    in either rank fails the test with its traceback, and ranks still running after `timeout` seconds
    are killed and fail it too."""
    errors = _CONTEXT.SimpleQueue()
    port = free_port()
    ranks = [_CONTEXT.Process(target=_rank, args=(rank, port, fn, args, errors), daemon=True) for rank in range(2)]
    for p in ranks:
        p.start()
    deadline = time.monotonic() + timeout
    running = ranks
    while running and errors.empty() and time.monotonic() < deadline:  # a failed rank ends the world at once
        multiprocessing.connection.wait([p.sentinel for p in running], timeout=min(1.0, deadline - time.monotonic()))
        running = [p for p in running if p.exitcode is None]
    hung = [rank for rank, p in enumerate(ranks) if p.exitcode is None]
    for p in ranks:
        if p.exitcode is None:
            p.kill()
            p.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        pytest.fail("\n".join(f"rank {rank} failed:\n{tb}" for rank, tb in sorted(failures)), pytrace=False)
    if hung:
        pytest.fail(f"{fn.__name__} on two ranks: rank(s) {hung} still running after {timeout} s, killed", pytrace=False)
    assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]
