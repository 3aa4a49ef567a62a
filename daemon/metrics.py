"""Optional Prometheus endpoint (``--metrics-port``; needs the ``prometheus_client`` package).

Exposed, on a registry of its own (so several daemons can live in one test process):

- ``product_studio_images_total{outcome}``: edited, skipped, failed, duplicate, retried
- ``product_studio_stage_seconds{stage}``: histogram per stage: ``queue`` (arrival to start),
  ``hash``, ``process``, ``dispose``, plus every stage the pipeline reports in its record's
  ``timings`` (``detect``, ``enhance``, ...)
- ``product_studio_queue_depth``, ``product_studio_in_progress``, ``product_studio_intake_pending``
- ``product_studio_rules_reloads_total{result}``: accepted, refused
"""

from __future__ import annotations

from typing import Any

from daemon.config import DaemonConfigError

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class NullMetrics:
    port: int | None = None

    def outcome(self, outcome: str) -> None: ...
    def observe(self, stage: str, seconds: float) -> None: ...
    def queue_depth(self, n: int) -> None: ...
    def intake_pending(self, n: int) -> None: ...
    def in_progress(self, n: int) -> None: ...
    def rules_reload(self, result: str) -> None: ...
    def close(self) -> None: ...


class PrometheusMetrics(NullMetrics):
    def __init__(self, port: int, host: str = "127.0.0.1"):
        try:
            import prometheus_client as pc
        except ImportError:
            raise DaemonConfigError(
                "--metrics-port needs the prometheus_client package, which is not installed "
                "(pip install prometheus_client)") from None
        reg = pc.CollectorRegistry()
        self._images = pc.Counter("product_studio_images", "Inputs by outcome", ["outcome"], registry=reg)
        self._stage = pc.Histogram("product_studio_stage_seconds", "Seconds per stage of one image", ["stage"],
                                   buckets=_BUCKETS, registry=reg)
        self._queue = pc.Gauge("product_studio_queue_depth", "Inputs waiting in the ledger (pending)", registry=reg)
        self._intake = pc.Gauge("product_studio_intake_pending", "Files seen, waiting to settle", registry=reg)
        self._busy = pc.Gauge("product_studio_in_progress", "Images being processed now", registry=reg)
        self._rules = pc.Counter("product_studio_rules_reloads", "Rule file reloads", ["result"], registry=reg)
        for o in ("edited", "skipped", "failed", "duplicate", "retried"):
            self._images.labels(outcome=o)
        try:
            self._server, self._thread = pc.start_http_server(port, addr=host, registry=reg)
        except OSError as e:
            raise DaemonConfigError(f"cannot serve metrics on {host}:{port}: {e}") from None
        self.port = self._server.server_port
        self.registry = reg

    def outcome(self, outcome: str) -> None:
        self._images.labels(outcome=outcome).inc()

    def observe(self, stage: str, seconds: float) -> None:
        self._stage.labels(stage=stage).observe(max(0.0, float(seconds)))

    def queue_depth(self, n: int) -> None:
        self._queue.set(n)

    def intake_pending(self, n: int) -> None:
        self._intake.set(n)

    def in_progress(self, n: int) -> None:
        self._busy.set(n)

    def rules_reload(self, result: str) -> None:
        self._rules.labels(result=result).inc()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_metrics(port: int | None, host: str = "127.0.0.1") -> Any:
    return NullMetrics() if port is None else PrometheusMetrics(port, host)
