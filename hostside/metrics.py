"""Prometheus metrics of the host-side daemons, each on its own ``GET /metrics`` (no token).

``HelperMetrics`` for ``violin-helper``, ``ServerMetrics`` for ``violin-snapshot-server``;
like the controller's (``violin_core.metrics``), each owns a registry (a fresh one unless
given), so tests build their own. README "Metrics" lists every metric.
"""

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram

from violin_core.metrics import LONG_BUCKETS, SHORT_BUCKETS, Metrics

SNAPSHOT_RESULTS = ("done", "failed")
UPLOAD_RESULTS = ("stored", "checksum_mismatch", "bad_request", "storage_error", "conflict")


class HelperMetrics(Metrics):
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        super().__init__(registry)
        r = self.registry
        self.snapshots = Counter("violin_helper_snapshots", "member snapshots this helper ended, by backend and "
                                 "result (done, failed)", ["backend", "result"], registry=r)
        self.duration = Histogram("violin_helper_snapshot_duration_seconds", "the backend's capture of a member "
                                  "(CRIU dump, VM migration) with its cut and the image's upload", ["backend"],
                                  buckets=LONG_BUCKETS, registry=r)
        self.pause = Histogram("violin_helper_pause_seconds", "how long a member was stopped for its snapshot",
                               ["backend"], buckets=SHORT_BUCKETS, registry=r)
        self.stored_bytes = Counter("violin_helper_stored_bytes", "bytes of member images sent to snapshot servers",
                                    ["backend"], registry=r)

    def snapshot_done(self, backend: str, seconds: float, report) -> None:
        self.snapshots.labels(backend, "done").inc()
        self.duration.labels(backend).observe(max(0.0, seconds))
        if report.pause_ms is not None:
            self.pause.labels(backend).observe(report.pause_ms / 1000.0)
        self.stored_bytes.labels(backend).inc(max(0, report.bytes or 0))

    def snapshot_failed(self, backend: str) -> None:
        self.snapshots.labels(backend, "failed").inc()


class ServerMetrics(Metrics):
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        super().__init__(registry)
        r = self.registry
        self.uploads = Counter("violin_server_uploads", "image file uploads (PUT), by result (stored, "
                               "checksum_mismatch, bad_request, storage_error, conflict)", ["result"], registry=r)
        self.stored_bytes = Counter("violin_server_stored_bytes", "bytes of image files stored", registry=r)
        self.stored_files = Counter("violin_server_stored_files", "image files stored", registry=r)
        for result in UPLOAD_RESULTS:
            self.uploads.labels(result)

    def stored(self, size: int) -> None:
        self.uploads.labels("stored").inc()
        self.stored_files.inc()
        self.stored_bytes.inc(size)

    def refused(self, result: str) -> None:
        self.uploads.labels(result).inc()
