"""Stop the local Ray instance of a driver that died without stopping it.

A driver that starts its own Ray instance (`ray.init(address="local")`) stops it on a normal exit or
Ctrl-C. Killed (SIGKILL, the OOM killer, a closed terminal), it leaves the GCS, the raylet, the
dashboard and its agents and the idle workers running until `ray stop`, which would also stop every
other Ray instance of the machine. This watcher, started by the driver in its own session, notes the
driver's descendants every second; when the driver is gone it stops those that are still running.

    python -m sparta.platform.reaper DRIVER_PID
"""

import os
import sys
import time

import psutil


def watch(driver_pid: int, interval_s: float = 1.0) -> list[psutil.Process]:
    """Returns the processes it had to stop (none after a clean exit of the driver)."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            seen.update({p.pid: p for p in driver.children(recursive=True) if p.pid != os.getpid()})
        except psutil.NoSuchProcess:
            break
        time.sleep(interval_s)
    left = [p for p in seen.values() if p.is_running()]  # is_running() also rules out a reused pid
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, stubborn = psutil.wait_procs(left, timeout=5)
    for process in stubborn:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def start_for_this_process() -> None:
    """Start the watcher of this driver process (once), detached from its terminal and signals."""
    import subprocess

    global _started
    if _started:
        return
    subprocess.Popen([sys.executable, "-m", "sparta.platform.reaper", str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _started = True


_started = False

if __name__ == "__main__":
    watch(int(sys.argv[1]))
