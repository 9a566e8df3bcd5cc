"""Part "vm" of bench_disruption (issue 11, goals 1 and 3 for VMs): a VM's pause with the cut beside the
same migration without the hook, and its deaf time beside its pause.

For slices of 1 and 3 VMs, with the helper's vm_hold at switchover and at precopy (the project's guest image, TCG, 128 MiB, the oracle's endpoint streaming to
each other), each round takes a snapshot through the controller and the helper (frames to a VM held only
around its switchover: hostside/backends/libvirt.py SwitchoverHold), then, on the same VMs and the same
snapshot server, migrates every VM at once with the same QMP sequence and stream but no prepare, no
proofs and no cut (QEMU converges on its own): the bare mechanism. A pause is QEMU's STOP -> RESUME;
deaf time is the controller's ``held_ms`` (the member's prepare to the release of its held frames).
"""

import shutil
import tempfile
import threading
import time
from contextlib import ExitStack

from benchkit import BenchError, helper_cut_mode, summary, timed_snapshot
from hostside.backends import libvirt as vm
from hostside.store.client import ImageServer
from lab import lab, slicelab, vms
from topologies.lan import LanTopo


def add_arguments(parser):
    parser.add_argument("--vm-rounds", type=int, default=6, help="vm: snapshots (and bare migrations) per size")
    parser.add_argument("--vm-sizes", default="1,3", help="vm: VMs per slice (default 1,3)")
    parser.add_argument("--vm-holds", default="switchover,precopy",
                        help="vm: the helper's vm_hold settings to compare (default switchover,precopy)")
    parser.add_argument("--vm-cuts", default="async,sync",
                        help="vm: the helper's cut modes to compare (VIOLIN_CUT; default async,sync)")


def bare_round(libvirt, storage, guests, label):
    """Every VM migrated at once without the hook, as a snapshot migrates them: their pauses in ms."""
    results, errors = {}, []

    def migrate(guest):
        try:
            report = libvirt.migrate_out(guest.name, lambda reader: storage.upload_stream(label, guest.name, "vm.save",
                                                                                        reader), lambda: 0.0)
            results[guest.name] = report
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append("%s: %s" % (guest.name, error))
    threads = [threading.Thread(target=migrate, args=(g,)) for g in guests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    if errors or len(results) != len(guests):
        raise RuntimeError("bare migration failed: %s" % "; ".join(errors or ["no answer"]))
    return [{"pause_ms": round(r.qemu_pause_ms if r.qemu_pause_ms is not None else r.pause_ms, 3),
             "precopy_ms": round(r.precopy_ms, 1), "total_ms": round(r.total_ms, 1)} for r in results.values()]


def measure(n, rounds, log, hold="switchover", cut="async"):
    controller = lab.ControllerProcess(config=slicelab.controller_config())
    workdir = tempfile.mkdtemp(prefix="bench-dvm-")
    record = {"vms": n, "vm_hold": hold, "cut_mode": cut, "snapshots": [], "bare": []}
    try:
        with ExitStack() as stack:
            stack.enter_context(helper_cut_mode(cut))  # the helper started below inherits it
            stack.callback(controller.stop)
            controller.start()
            prefix = lab.run_prefix()
            net = stack.enter_context(lab.network(LanTopo(1, prefix=prefix), controller))
            addresses = {i: "10.0.0.%d" % (100 + i) for i in range(1, n + 1)}
            guests = [vms.seqstream_guest("%sdvm%d" % (prefix, i), i, addresses[i] + "/8", "52:54:00:76:03:%02x" % i,
                                          net.switches[0].name, {k: v for k, v in addresses.items() if k != i}, 100)
                      for i in range(1, n + 1)]
            stack.enter_context(vms.guests(guests))
            members = stack.enter_context(slicelab.helped_slice(controller, net, workdir, hosts=[], guests=guests,
                                                                helper_settings={"vm_hold": hold}))
            time.sleep(2.0)
            libvirt = vm.Libvirt()
            storage = ImageServer(members.server_url, slicelab.SERVER_TOKEN)
            for i in range(rounds):  # interleaved: a snapshot, then the same VMs' bare migrations
                view, wall_ms = timed_snapshot(controller, "dvm-%d" % i)
                for member in view["members"]:
                    image = member["image"]
                    record["snapshots"].append({
                        "snapshot": view["id"], "member": member["name"], "wall_ms": round(wall_ms, 1),
                        "pause_ms": member.get("pause_ms"), "held_ms": member.get("held_ms"),
                        "flip_ms": member.get("flip_ms"), "hook_ms": image.get("hook_ms"),
                        "precopy_ms": image.get("precopy_ms"), "hold": image.get("hold"), "cut": image.get("cut"),
                        "prepare_call_ms": image.get("prepare_call_ms"),
                        "prepare_purge_ms": image.get("prepare_purge_ms")})
                time.sleep(0.3)
                record["bare"] += bare_round(libvirt, storage, guests, "bare-%d" % i)
                log("  %d VMs, vm_hold %s, cut %s: round %d/%d, snapshot %.0f ms" % (n, hold, cut, i + 1, rounds, wall_ms))
                time.sleep(0.3)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    snaps = record["snapshots"]
    hooked = [s["pause_ms"] for s in snaps]
    bare = [b["pause_ms"] for b in record["bare"]]
    s_hooked, s_bare = summary(hooked), summary(bare)
    record["summary"] = {
        "pause_ms_with_cut": s_hooked, "pause_ms_without_hook": s_bare,
        "pause_ratio_p50": _ratio(s_hooked, s_bare, "p50"), "pause_ratio_p95": _ratio(
            {"p95": _pct(hooked, 95)}, {"p95": _pct(bare, 95)}, "p95"),
        "held_ms": summary([s["held_ms"] for s in snaps]),
        "deaf_minus_pause_ms": summary([s["held_ms"] - s["pause_ms"] for s in snaps
                                        if s["held_ms"] is not None and s["pause_ms"] is not None]),
        "precopy_ms_with_cut": summary([s["precopy_ms"] for s in snaps]),
        "precopy_ms_without_hook": summary([b["precopy_ms"] for b in record["bare"]]),
        "hook_ms": summary([s["hook_ms"] for s in snaps]),
        "prepare_ms": summary([(s["hold"] or {}).get("prepare_ms") for s in snaps]),
        "stop_after_gate_ms": summary([(s["hold"] or {}).get("stop_after_gate_ms") for s in snaps]),
        "cuts": {kind: sum(1 for s in snaps if s.get("cut") == kind) for kind in sorted({s.get("cut") or "" for s in snaps})},
        "held_at_switchover": sum(1 for s in snaps if (s["hold"] or {}).get("at") == "switchover"),
        "held_again_from_start": sum(1 for s in snaps if (s["hold"] or {}).get("retried")),
        "members": len(snaps)}
    return record


def _pct(values, q):
    from benchkit import pct
    values = [v for v in values if v is not None]
    return round(pct(values, q), 3) if values else None


def _ratio(a, b, key):
    return round(a[key] / b[key], 3) if a.get(key) and b.get(key) else None


def run(args, log):
    reason = vms.libvirt_available()
    if reason:
        raise RuntimeError(reason)
    sizes = [int(x) for x in args.vm_sizes.split(",") if x]
    holds = [h for h in args.vm_holds.split(",") if h]
    cuts = [c for c in args.vm_cuts.split(",") if c]
    if not cuts or set(cuts) - {"async", "async-call", "sync"}:
        raise BenchError("--vm-cuts takes some of async, async-call, sync")
    lab.ensure_ovs()
    return {"parameters": {"rounds": args.vm_rounds, "sizes": sizes,
                           "guest": "scripts/build_guest.sh image, TCG, 128 MiB, vseq UDP+TCP 100/s per peer",
                           "pause": "QEMU's STOP -> RESUME; bare: every VM migrated at once without the hook",
                           "deaf": "controller's held_ms: prepare -> release of the member's held frames"},
            "series": _each({"%d-%s-%s" % (n, hold, cut): (lambda n=n, hold=hold, cut=cut: measure(
                n, args.vm_rounds, log, hold, cut)) for n in sizes for hold in holds for cut in cuts}, log)}


def _each(plan, log):
    """Every series of ``plan`` (key -> its measurement); one that fails (e.g. guests that do not boot on
    a loaded machine) is recorded with its error instead of losing the others."""
    series = {}
    for key, work in plan.items():
        try:
            series[key] = work()
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            log("  %s failed: %s" % (key, str(error).splitlines()[0]))
            series[key] = {"error": str(error)[:2000]}
    return series


def report(record):
    lines = []
    for n, series in record["series"].items():
        if "error" in series:
            lines.append("%s: failed: %s" % (n, series["error"].splitlines()[0]))
            continue
        s = series["summary"]
        lines.append("%s (VMs-vm_hold-cut): pause with cut p50 %s / p95 %s ms vs without hook %s / %s ms (ratio p50 %s, p95 %s); "
                     "deaf p50 %s ms, deaf - pause p50 %s p90 %s ms; held at switchover %s of %s, "
                     "held again from start %s" % (
                         n, s["pause_ms_with_cut"].get("p50"), _pct([x["pause_ms"] for x in series["snapshots"]], 95),
                         s["pause_ms_without_hook"].get("p50"), _pct([b["pause_ms"] for b in series["bare"]], 95),
                         s["pause_ratio_p50"], s["pause_ratio_p95"], s["held_ms"].get("p50"),
                         s["deaf_minus_pause_ms"].get("p50"), s["deaf_minus_pause_ms"].get("p90"),
                         s["held_at_switchover"], s["members"], s["held_again_from_start"])
                     + "; cuts %s, QEMU's stop after the gate p50 %s ms" % (
                         s.get("cuts"), (s.get("stop_after_gate_ms") or {}).get("p50")))
    return lines


def _short(key):
    """A series' label: "3-switchover-async" -> "3 VMs async" (the hold is said when it is not the default)."""
    n, _, rest = key.partition("-")
    return "%s VM%s %s" % (n, "" if n == "1" else "s", rest.replace("switchover-", "").replace("-", " "))


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = [n for n, series in record["series"].items() if "error" not in series]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    data, labels = [], []
    for n in sizes:
        series = record["series"][n]
        data += [[s["pause_ms"] for s in series["snapshots"] if s["pause_ms"] is not None],
                 [b["pause_ms"] for b in series["bare"]]]
        labels += ["%s cut" % _short(n), "%s bare" % _short(n)]
    axes[0].boxplot(data, tick_labels=labels)
    axes[0].set_ylabel("pause (QEMU STOP -> RESUME), ms")
    axes[0].set_title("VM pause: with the cut vs the same migration")
    data, labels = [], []
    for n in sizes:
        snaps = record["series"][n]["snapshots"]
        data += [[s["pause_ms"] for s in snaps if s["pause_ms"] is not None],
                 [s["held_ms"] for s in snaps if s["held_ms"] is not None]]
        labels += ["%s pause" % _short(n), "%s deaf" % _short(n)]
    axes[1].boxplot(data, tick_labels=labels)
    axes[1].set_ylabel("ms")
    axes[1].set_title("deaf time (frames held) vs pause")
    for axis in axes:
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
