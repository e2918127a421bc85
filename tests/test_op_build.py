"""DeepSpeed's JIT-built ops never make a run wait silently: a one-process CPU run builds none, a
lock whose builder is gone is removed whatever its age, a wait on a live build says what, where and
how long, and each install gets its own op cache."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from toolkit.engine import isolate_op_cache, op_build_holders, wait_for_op_build

ROOT = Path(__file__).resolve().parent.parent

# holds the lock file open as torch's FileBaton does while it builds, then releases it as torch does
HOLDER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
os.close(fd)
os.remove(sys.argv[1])
"""


def env_with(ext_dir: Path) -> dict:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def hold_lock(lock: Path, seconds: float) -> subprocess.Popen:
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_lock_nobody_holds_is_removed_at_once_whatever_its_age(tmp_path, capsys):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # just now: the old check left any lock younger than 10 minutes, and torch waited for ever
    t0 = time.monotonic()
    wait_for_op_build(lock.parent)
    assert not lock.exists() and time.monotonic() - t0 < 10
    assert f"removed {lock}: the build of DeepSpeed's deepspeed_shm_comm op that left it is gone" in capsys.readouterr().err


def test_a_wait_on_a_live_build_says_what_it_waits_for_where_and_for_how_long(tmp_path, capsys):
    lock = tmp_path / "cpu_adam" / "lock"
    holder = hold_lock(lock, 3)
    wait_for_op_build(lock.parent, poll=0.2, say_every=1)
    holder.wait()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("waiting")]
    assert len(lines) >= 2, lines  # every few seconds, not once
    assert f"waiting for DeepSpeed's cpu_adam op being built by {holder.pid} (python" in lines[0]
    assert f"(lock {lock})" in lines[0] and lines[-1].endswith("s so far")
    assert not lock.exists()  # a live builder's lock is never removed: it removed it itself


def test_a_one_process_cpu_run_builds_no_op_and_waits_on_no_lock(tmp_path):
    ext = tmp_path / "ext"
    holder = hold_lock(ext / "deepspeed_shm_comm" / "lock", 600)  # another process's build, going on for ever
    try:
        code = "from toolkit.engine import init_distributed; print(init_distributed())"
        out = subprocess.run([sys.executable, "-c", code], env=env_with(ext), capture_output=True, text=True,
                             timeout=120)
    finally:
        holder.kill()
    assert out.returncode == 0 and out.stdout.strip().endswith("(0, 1)"), out.stderr
    assert not list(ext.rglob("*.so")) and not list(ext.rglob("*.o"))  # nothing was built


def test_each_install_gets_its_own_op_cache_unless_one_is_given(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    isolate_op_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch-extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    isolate_op_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


# builds one of DeepSpeed's CPU ops as the toolkit guards a build: Adagrad's, one source file (the
# shared-memory op's two took ~1.5x the compiler time), and an op the toolkit never builds itself
BUILD = textwrap.dedent("""
    from toolkit.engine import ensure_accelerator, guarded_op_build
    ensure_accelerator()
    from deepspeed.ops.op_builder.cpu import CPUAdagradBuilder
    with guarded_op_build("cpu_adagrad"):
        CPUAdagradBuilder().load(verbose=False)
    print("loaded", flush=True)
""")


@pytest.mark.slow
def test_a_build_killed_mid_way_does_not_stop_the_next_one(tmp_path):
    ext = tmp_path / "ext"
    where = ext / "cpu_adagrad"
    first = subprocess.Popen([sys.executable, "-c", BUILD], env=env_with(ext), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (where / "build.ninja").exists():  # torch holds the lock from before it writes build.ninja
        assert first.poll() is None and time.monotonic() < deadline, "the first build never started"
        time.sleep(0.2)
    time.sleep(2)  # g++ is compiling now
    assert (where / "lock").exists()
    os.killpg(first.pid, signal.SIGKILL)  # the build and ninja
    first.wait()
    # ninja gives each compiler a process group of its own: those left compiling would be waited for
    # (minutes on a busy machine); gone too, as after a reboot or the OOM killer
    for holder in op_build_holders(where):
        os.kill(int(holder.split()[0]), signal.SIGKILL)
    assert (where / "lock").exists()  # what torch would wait on for ever
    second = subprocess.run([sys.executable, "-c", BUILD], env=env_with(ext), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0 and second.stdout.strip() == "loaded", second.stderr
    assert f"removed {where / 'lock'}" in second.stderr
