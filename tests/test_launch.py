"""The tests' own process launcher (tests/launch.py): a script run is what `python script.py` gives, and a
run or a two-rank world that hangs fails its test within its bound, with a readable message."""
import time

import pytest
import torch.distributed as dist

from launch import on_two_ranks, run, script


def test_a_script_runs_as_main_with_its_argv_environment_streams_and_exit_status(tmp_path):
    (tmp_path / "probe.py").write_text(
        "import os, sys\n"
        "print('argv', sys.argv[1:], 'cwd', os.getcwd(), 'env', os.environ.get('PROBE'))\n"
        "print('to stderr', file=sys.stderr)\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('error: ' + sys.argv[1])\n")
    result = script("probe.py", "bad input", env={"PROBE": "x"}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == f"argv ['bad input'] cwd {tmp_path} env x\n"
    assert result.stderr == "to stderr\nerror: bad input\n"
    (tmp_path / "crash.py").write_text("import torch\nprint(torch.get_num_threads())\nraise ValueError('deep')\n")
    crashed = script("crash.py", cwd=tmp_path)
    assert crashed.returncode == 1 and crashed.stdout == "1\n"  # one torch thread unless the env says otherwise
    assert "Traceback" in crashed.stderr and crashed.stderr.strip().endswith("ValueError: deep")
    assert script("crash.py", env={"OMP_NUM_THREADS": "2"}, cwd=tmp_path).stdout == "2\n"
    assert run("-m", "json.tool", "--help").startswith("usage:")


def alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_script_still_running_at_its_timeout_is_killed_with_what_it_started(tmp_path):
    (tmp_path / "hang.py").write_text("import subprocess, sys, time\n"
                                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                                      "print(child.pid, flush=True)\ntime.sleep(600)\n")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"hang.py: still running after 2 s, killed:\n\d+") as failed:
        script("hang.py", timeout=2, cwd=tmp_path)
    assert time.monotonic() - start < 30
    grandchild = int(str(failed.value).split("killed:\n")[1].split()[0])
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)


def _waits_for_a_barrier_rank_1_never_joins(world):
    if world.rank == 0:
        dist.barrier()
    else:
        time.sleep(600)


def _rank_1_raises(world):
    if world.rank == 1:
        raise ValueError("rank one broke")
    dist.barrier()


def test_two_ranks_that_hang_are_killed_at_the_bound_and_fail_the_test():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"rank\(s\) \[0, 1\] still running after 3 s, killed"):
        on_two_ranks(_waits_for_a_barrier_rank_1_never_joins, timeout=3)
    assert time.monotonic() - start < 30


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(pytest.fail.Exception, match=r"(?s)rank 1 failed:\nTraceback.*ValueError: rank one broke"):
        on_two_ranks(_rank_1_raises, timeout=60)
