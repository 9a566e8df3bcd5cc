"""The controller's pure core: everything the RyuApp and REST shims delegate to.

Handlers take ``now`` (a monotonic time in seconds) and return the OpenFlow
messages to send. ``build_rest_app`` wires the REST routes to it.
"""

from typing import Callable, Iterable, List, Tuple

from . import __version__, of
from .config import Config
from .fabric import Fabric
from .rest import HttpError, RestApp


class ViolinController:
    def __init__(self, config: Config, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self.fabric = Fabric(config.fabric)
        self.started_at = clock()
        self.connected: set = set()
        self.errors: dict = {}

    # --- OpenFlow events (the shim converts ryu events into these calls) ------

    def switch_up(self, dpid: int, ports: Iterable[Tuple[int, str, bool]]) -> List[of.Message]:
        self.connected.add(dpid)
        return self.fabric.switch_up(self.clock(), dpid, ports)

    def switch_down(self, dpid: int) -> List[of.Message]:
        self.connected.discard(dpid)
        return self.fabric.switch_down(self.clock(), dpid)

    def port_changed(self, dpid: int, port_no: int, name: str, up: bool, deleted: bool) -> List[of.Message]:
        return self.fabric.port_changed(self.clock(), dpid, port_no, name, up, deleted)

    def packet_in(self, dpid: int, in_port: int, data: bytes) -> List[of.Message]:
        return self.fabric.packet_in(self.clock(), dpid, in_port, data)

    def switch_error(self, dpid: int) -> None:
        """A switch refused a message: count it, so health shows it."""
        self.errors[dpid] = self.errors.get(dpid, 0) + 1

    def tick(self) -> List[of.Message]:
        return self.fabric.tick(self.clock())

    # --- views ---------------------------------------------------------------

    def health(self) -> dict:
        now = self.clock()
        fabric = self.fabric
        return {
            "status": "ok",
            "app": "violin_snapshot",
            "version": __version__,
            "uptime_s": round(now - self.started_at, 3),
            "switches": len(fabric.switches),
            "links": len(fabric.links) // 2,
            "hosts": len(fabric.hosts),
            "settled": fabric.settled(now),
            "counters": dict(fabric.counters),
            "switch_errors": sum(self.errors.values()),
        }

    def topology(self) -> dict:
        return self.fabric.describe(self.clock())


def build_rest_app(controller: ViolinController) -> RestApp:
    app = RestApp(controller.config.api_token)

    @app.route("GET", "/health")
    def health(_body):
        return controller.health()

    @app.route("GET", "/topology")
    def topology(_body):
        return controller.topology()

    @app.route("GET", "/topology/switches/{dpid}")
    def switch(_body, dpid):
        try:
            number = int(dpid, 16)
        except ValueError:
            raise HttpError(400, "dpid must be hexadecimal, got %r" % dpid) from None
        for entry in controller.topology()["switches"]:
            if int(entry["dpid"], 16) == number:
                return entry
        raise HttpError(404, "no switch with dpid %s" % dpid)

    return app
