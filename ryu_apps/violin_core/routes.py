"""The REST routes under ``/violin`` (documented in docs/openapi.yaml): each one a line or two that
hands the parsed request to the controller; validation, auth and errors are the edge's (``rest.py``)."""

from .controller import ViolinController
from .coordinator import SnapshotState
from .errors import Refused
from .members import parse_member
from .rest import Body, RestApp


def build_rest_app(controller: ViolinController) -> RestApp:
    app = RestApp(controller.config.api_token)
    route = app.route
    coordinator, hosts = controller.coordinator, controller.fabric.hosts

    @route("GET", "/health")
    def health(_body):
        return controller.health()

    @route("GET", "/metrics")
    def metrics(_body):
        content_type, data = controller.metrics.exposition()
        return Body(data, content_type)

    @route("GET", "/topology")
    def topology(_body):
        return controller.topology()

    @route("GET", "/topology/switches/{dpid}")
    def switch(_body, dpid):
        try:
            number = int(dpid, 16)
        except ValueError:
            raise Refused(400, "dpid must be hexadecimal, got %r" % dpid) from None
        for entry in controller.topology()["switches"]:
            if int(entry["dpid"], 16) == number:
                return entry
        raise Refused(404, "no switch with dpid %s" % dpid)

    @route("GET", "/members")
    def members(_body):
        return {"members": [m.describe(hosts) for m in coordinator.members.values()]}

    @route("POST", "/members")
    def add_member(body):
        return 201, coordinator.add_member(parse_member(body)).describe(hosts)

    @route("GET", "/members/{name}")
    def member(_body, name):
        return coordinator.members.get(name).describe(hosts)

    @route("PUT", "/members/{name}")
    def put_member(body, name):
        created, member = coordinator.put_member(parse_member(body, name))
        return (201 if created else 200), member.describe(hosts)

    @route("DELETE", "/members/{name}")
    def remove_member(_body, name):
        return coordinator.remove_member(name).describe(hosts)

    @route("GET", "/snapshots")
    def snapshots(_body):
        return {"snapshots": controller.snapshots()}

    @route("POST", "/snapshots")
    def start(body):
        return 202, controller.start_snapshot(body)

    @route("GET", "/snapshots/{snapshot_id}")
    def snapshot(_body, snapshot_id):
        return controller.snapshot_view(snapshot_id)

    @route("DELETE", "/snapshots/{snapshot_id}")
    def delete(_body, snapshot_id):
        manifest = controller.snapshot_view(snapshot_id)
        if manifest["state"] == SnapshotState.RUNNING:
            raise Refused(409, "snapshot %s is running; abort it first" % snapshot_id)
        controller.delete_snapshot(manifest)
        return {"deleted": snapshot_id}

    @route("POST", "/snapshots/{snapshot_id}/restore")
    def restore(body, snapshot_id):
        return 202, controller.restorer.start(snapshot_id, body)

    @route("GET", "/schedule")
    def schedule(_body):
        return controller.scheduler.view()

    @route("PUT", "/schedule")
    def set_schedule(body):
        return controller.scheduler.set(body, coordinator.members.get)

    @route("DELETE", "/schedule")
    def clear_schedule(_body):
        return controller.scheduler.clear()

    @route("GET", "/restores")
    def restores(_body):
        return {"restores": [job.view() for job in controller.restorer.jobs.values()]}

    @route("GET", "/restores/{restore_id}")
    def restore_view(_body, restore_id):
        return controller.restorer.get(restore_id).view()

    @route("POST", "/snapshots/{snapshot_id}/abort")
    def abort(body, snapshot_id):
        return controller.abort(snapshot_id, body)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/prepare")
    def prepare(body, snapshot_id, name):
        return controller.prepare(snapshot_id, name, body)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/cut")
    def cut(body, snapshot_id, name):
        return controller.cut(snapshot_id, name, body)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/done")
    def done(body, snapshot_id, name):
        return controller.done(snapshot_id, name, body)

    @route("POST", "/snapshots/{snapshot_id}/members/{name}/failed")
    def failed(body, snapshot_id, name):
        return controller.failed(snapshot_id, name, body)

    return app
