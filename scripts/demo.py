#!/usr/bin/env python3
"""The end-to-end demo (the README's main command runs it after set-up).

Brings up the GENI-VIOLIN demo shape (4 members, 2 snapshot servers, two
switches) on real Open vSwitch under ``violin-controller``, shows what the
controller discovered over its REST API, checks that every host reaches every
other (ping) and that TCP runs at speed across the trunk, then tears down only
what it created. Later issues grow this into snapshot, failure and restore.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from topologies import lab  # noqa: E402
from topologies.violin_demo import ViolinDemoTopo  # noqa: E402


def step(text):
    print("\n== %s" % text, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the TCP run (default 3)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (Mininet and Open vSwitch need it)", file=sys.stderr)
        return 2
    launcher = os.path.join(os.path.dirname(sys.executable), "violin-controller")
    controller = lab.ControllerProcess(command=[launcher])
    started = time.monotonic()
    try:
        step("starting violin-controller (OpenFlow :%d, REST http://127.0.0.1:%d/violin)"
             % (controller.of_port, controller.rest_port))
        controller.start()
        topo = ViolinDemoTopo(prefix=lab.run_prefix())
        step("bringing up the demo LAN: members h1-h4, snapshot servers ss1 ss2, switches s1 s2")
        with lab.network(topo, controller) as net:
            _, topology = controller.get("/violin/topology")
            for switch in topology["switches"]:
                roles = ", ".join("%s=%s" % (p["name"], p["role"]) for p in switch["ports"])
                print("  switch %s: %s" % (switch["dpid"], roles))
            print("  links: %d, settled: %s" % (len(topology["links"]), topology["settled"]))
            step("ping between every pair of hosts")
            loss = net.pingAll(timeout=2)
            _, health = controller.get("/violin/health")
            print("  loss %.0f%%; controller learned %d hosts" % (loss, health["hosts"]))
            step("TCP across the trunk: h1 -> h4 (iperf3, %.0f s)" % args.seconds)
            h1, h4 = net.get(topo.prefix + "h1"), net.get(topo.prefix + "h4")
            server = h4.popen(["iperf3", "-s", "-1", "-B", h4.IP(), "-p", "5201"])
            time.sleep(0.5)
            result = json.loads(h1.cmd("iperf3 -J -c %s -p 5201 -t %s" % (h4.IP(), args.seconds)))
            server.wait(10)
            mbps = result["end"]["sum_received"]["bits_per_second"] / 1e6
            print("  %.0f Mbit/s received" % mbps)
            ok = loss == 0.0 and mbps > 0
        step("torn down; demo %s in %.1f s" % ("PASSED" if ok else "FAILED", time.monotonic() - started))
        return 0 if ok else 1
    except lab.LabError as error:
        print("demo failed: %s" % error, file=sys.stderr)
        return 1
    finally:
        controller.stop()


if __name__ == "__main__":
    sys.exit(main())
