"""What the benchmark scripts share: errors, signal handling, machine facts, bring-up, JSON output.

Importing it puts the repository root and ``ryu_apps`` on ``sys.path``, so the
scripts can import ``lab``, ``workloads`` and ``topologies`` after it.
"""

import contextlib
import datetime
import json
import os
import platform
import statistics
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "ryu_apps")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from lab.lab import LabError, network  # noqa: E402


class BenchError(RuntimeError):
    """A run failed (exit code 1)."""


@contextlib.contextmanager
def helper_cut_mode(mode: str):
    """Helpers started inside get ``VIOLIN_CUT=mode`` (they inherit the environment); restored after."""
    before = os.environ.get("VIOLIN_CUT")
    os.environ["VIOLIN_CUT"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VIOLIN_CUT", None)
        else:
            os.environ["VIOLIN_CUT"] = before


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (exit code 130)."""


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def ignore_signals():
    """Ignore SIGINT and SIGTERM (during cleanup)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def handle_signals():
    """Turn SIGINT and SIGTERM into ``Interrupted``."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def check_host(parser, tools):
    """``parser.error`` unless running as root with every one of ``tools`` on PATH."""
    if os.geteuid() != 0:
        parser.error("must run as root (Mininet and Open vSwitch need it)")
    for tool in tools:
        if shutil.which(tool) is None:
            parser.error("%s not found on PATH" % tool)


def run(argv):
    """A command's stripped stdout, or None when it could not run."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _first_line(text):
    return text.splitlines()[0] if text else None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        return None


def _ryu_version():
    try:
        import importlib.metadata
        return importlib.metadata.version("ryu")
    except Exception:  # noqa: BLE001 - informational only
        return None


def machine_info(cpu_model=False, iperf3=False, **more):
    """The machine and its software; optional ``cpu_model``, ``iperf3_version``, then ``more`` at the end."""
    info = {"hostname": platform.node(), "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count()}
    if cpu_model:
        info["cpu_model"] = _cpu_model()
    info.update(kernel=platform.release(),
                ovs_version=_first_line(run(["ovs-vswitchd", "--version"]) or run(["ovs-vsctl", "--version"])),
                ovs_datapath="netdev (userspace)")
    if iperf3:
        info["iperf3_version"] = _first_line(run(["iperf3", "--version"]))
    info.update(python=platform.python_version(), ryu=_ryu_version(), loadavg_at_start=list(os.getloadavg()))
    info.update(more)
    return info


def timestamp():
    """Now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def bring_up(stack, controller, topo, what):
    """Start ``controller`` and ``topo``'s network (closed by ``stack``); a LabError becomes a BenchError."""
    try:
        controller.start()
        return stack.enter_context(network(topo, controller))
    except LabError as exc:
        raise BenchError("bringing up %s failed: %s" % (what, exc)) from None


def run_guarded(body):
    """Call ``body()``; (error text or None, exit code). Signals are ignored afterwards."""
    try:
        body()
    except Interrupted as exc:
        return "interrupted by %s" % exc, 130
    except BenchError as exc:
        return str(exc), 1
    except Exception as exc:  # noqa: BLE001 - report, don't dump a traceback
        return "%s: %s" % (type(exc).__name__, exc), 1
    finally:
        ignore_signals()
    return None, 0


def write_json(path, document):
    """Write ``document`` to ``path`` atomically (through ``path.tmp``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def save(name, path, document, error, code):
    """Write the results and report a failure on stderr; the script's exit code."""
    try:
        write_json(path, document)
    except OSError as exc:
        print("\n%s: cannot write %s: %s" % (name, path, exc), file=sys.stderr)
        return 1
    if error:
        print("\n%s: FAILED: %s" % (name, error), file=sys.stderr)
        print("partial results: %s" % path, file=sys.stderr)
        return code
    return 0


def cpu_seconds(pid, children=False):
    """CPU seconds (user + system) of ``pid`` so far, with its waited-for children's when ``children``
    (a helper's ``criu restore``); None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pct(values, q):
    """Linear-interpolated percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    r = lambda v: round(v, 3)  # noqa: E731
    return {"n": len(values), "min": r(min(values)), "p50": r(pct(values, 50)), "p90": r(pct(values, 90)),
            "p99": r(pct(values, 99)), "max": r(max(values)), "mean": r(statistics.fmean(values))}


def summary_p95(values):
    """``summary`` plus p95 (the goals of issue 11 name p50 and p95)."""
    values = [v for v in values if v is not None]
    found = summary(values)
    if values:
        found["p95"] = round(pct(values, 95), 3)
    return found


def timed_snapshot(controller, label, timeout=180.0):
    """Take a snapshot through the controller; (its complete view, wall ms). BenchError otherwise."""
    import time
    from violin_client.api import wait_until_done
    began = time.monotonic()
    status, snap = controller.request("POST", "/violin/snapshots", {"label": label})
    if status != 202:
        raise BenchError("snapshot refused: %s %s" % (status, snap))
    view = wait_until_done(controller.api, "/violin/snapshots/%s" % snap["id"], timeout=timeout)
    if view["state"] != "complete":
        raise BenchError("snapshot %s %s: %s" % (snap["id"], view["state"], view.get("reason")))
    return view, (time.monotonic() - began) * 1000


def finish_manual_snapshot(controller, snapshot_id, names, note, timeout=30.0):
    """Report every (manual) member of ``snapshot_id`` done and wait for the snapshot to complete; its
    view. BenchError for a refused done or a snapshot that did not complete."""
    from violin_client.api import ApiError, wait_until_done
    for name in names:
        status, answer = controller.request("POST", "/violin/snapshots/%s/members/%s/done" % (snapshot_id, name),
                                            {"note": note})
        if status != 200:
            raise BenchError("done of %s: %s %s" % (name, status, answer))
    try:
        view = wait_until_done(controller.api, "/violin/snapshots/%s" % snapshot_id, timeout, poll=0.02)
    except ApiError as error:
        raise BenchError("snapshot %s: %s" % (snapshot_id, error)) from None
    if view["state"] != "complete":
        raise BenchError("snapshot %s %s: %s" % (snapshot_id, view["state"], view.get("reason")))
    return view


def timed_restore(controller, snapshot_id, timeout=180.0):
    """Restore the whole slice from ``snapshot_id``; (the finished job, wall ms). BenchError otherwise."""
    import time
    from violin_client.api import wait_until_done
    began = time.monotonic()
    status, job = controller.request("POST", "/violin/snapshots/%s/restore" % snapshot_id, {})
    if status != 202:
        raise BenchError("restore refused: %s %s" % (status, job))
    job = wait_until_done(controller.api, "/violin/restores/%s" % job["id"], timeout=timeout)
    if job["state"] != "complete":
        raise BenchError("restore %s failed: %s" % (job["id"], job["reason"]))
    return job, (time.monotonic() - began) * 1000
