"""A real one-node Ray cluster (CPU only) for tests and benchmarks, walled off in namespaces of its own.

Ray's servers listen on every interface and Ray swaps 127.0.0.1 for the machine's routable
address, so `ray start --node-ip-address=127.0.0.1` alone would still expose it. Here the head
runs in a new network namespace, whose only interface is its own loopback, and a new pid
namespace: every process started inside (Ray's daemons, its jobs, a loop and the vLLM servers it
starts) is ended when the namespace's first process is killed -- by its pid, nothing else.
Commands reach the cluster by entering the namespaces (`nsenter`), as a user on the head node
would run them.

Needs root (or user namespaces), util-linux's unshare/nsenter and Ray (`pip install -e '.[ray]'`):
`missing()` says which is lacking. Used by tests/test_ray.py and benchmarks/ray_overhead.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
DASHBOARD_PORT = 8265  # inside the namespace nothing else listens
ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"


def missing() -> str | None:
    """Why a namespaced cluster cannot run here, or None."""
    try:
        import ray  # noqa: F401
        from ray.job_submission import JobSubmissionClient  # noqa: F401
    except ImportError as e:
        return f"Ray is not installed ({e}); pip install -e '.[ray]'"
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        return "unshare/nsenter (util-linux) or ip (iproute2) are missing"
    if subprocess.run(["unshare", "--net", "--pid", "--fork", "true"], capture_output=True).returncode:
        return "cannot create network/pid namespaces here (needs root or user namespaces)"
    return None


class NamespacedRay:
    def __init__(self, num_cpus: int = 2, object_store_mb: int = 80):
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the namespace's first process, as seen from outside

    def start(self, timeout: float = 180) -> "NamespacedRay":
        head = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=6379",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
                f"--num-cpus={self.num_cpus}", "--num-gpus=0",
                f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
                f"--temp-dir={self.temp / 'ray'}", "--disable-usage-stats"]
        script = "ip link set lo up && exec " + " ".join(head)  # a new namespace's loopback starts down
        self.log = open(self.temp / "head.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc", "sh", "-c", script],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.pid is None and time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            if children.exists() and children.read_text().split():
                self.pid = int(children.read_text().split()[0])
            else:
                time.sleep(0.1)
        # Up once the Job API answers and the head node is listed alive (a moment after the dashboard).
        probe = ("import sys; from ray.util.state import list_nodes; "
                 f"sys.exit(not list_nodes(address='{ADDRESS}', filters=[('state', '=', 'ALIVE')], timeout=5))")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.pid and self.run([sys.executable, "-c", probe]).returncode == 0:
                return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the Ray head did not come up in {timeout:.0f} s; its output:\n"
                           f"{(self.temp / 'head.log').read_text(errors='replace')[-3000:]}")

    def cmd(self, args: list[str], cwd: Path | str | None = None) -> list[str]:
        """`args` run inside the cluster's namespaces (on its head node, as it were), in `cwd`
        (entering a mount namespace would otherwise start them in its root)."""
        assert self.pid is not None, "the cluster is not running"
        return ["nsenter", f"--target={self.pid}", "--net", "--pid", "--mount", f"--wd={cwd or os.getcwd()}", *args]

    def run(self, args: list[str], timeout: float = 120, cwd: Path | str | None = None, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        return subprocess.run(self.cmd(args, cwd), timeout=timeout, text=True, **kw)

    @staticmethod
    def inner_pid(entered: subprocess.Popen, timeout: float = 30) -> int:
        """The pid of the command an `nsenter` (started with cmd()) runs: signal that one, since
        nsenter itself dies of SIGINT at once, leaving the command to run on unobserved."""
        children = Path(f"/proc/{entered.pid}/task/{entered.pid}/children")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = children.read_text().split() if children.exists() else []
            if found:
                return int(found[0])
            time.sleep(0.05)
        raise RuntimeError(f"nsenter (pid {entered.pid}) started nothing within {timeout} s")

    def jobs(self) -> list[dict]:
        """Every job the cluster knows, from its Job API: submission id, status, entrypoint."""
        code = ("import json; from ray.job_submission import JobSubmissionClient as C; "
                f"print(json.dumps([dict(submission_id=j.submission_id, status=str(j.status.value), "
                f"entrypoint=j.entrypoint, message=j.message) for j in C('{ADDRESS}').list_jobs()]))")
        out = self.run([sys.executable, "-c", code])
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """Kill the namespace's first process: the kernel then ends every process inside."""
        if self.proc is not None:
            with_pid = self.proc.pid
            try:
                os.kill(with_pid, signal.SIGKILL)  # unshare --kill-child takes its child along
            except ProcessLookupError:
                pass
            self.proc.wait(30)
            if self.pid is not None:
                for _ in range(100):  # the namespace's processes go with its first one
                    if not Path(f"/proc/{self.pid}").exists():
                        break
                    time.sleep(0.1)
            self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)
