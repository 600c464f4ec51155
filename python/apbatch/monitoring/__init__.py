"""What apbatch tells dashboards: the daemon's Prometheus metrics and the jobs' metrics records.

* `apbatch.monitoring.prometheus`: `DaemonMetrics` (a private registry per daemon: events,
  dead letters, submissions, refusals, job endings, queue depth, stage-latency histograms),
  `NullMetrics` (the dispatcher's default: does nothing) and :func:`serve_metrics` (the
  ``/metrics`` endpoint on loopback, ``monitoring.prometheus_port``);
* `apbatch.monitoring.job_metrics`: :func:`publish_job_metrics`, one JSON record per CCD-visit
  to the Kafka topic ``monitoring.job_metrics_topic``, never failing the job.
"""

from __future__ import annotations

from .job_metrics import job_metrics_record, publish_job_metrics
from .prometheus import DaemonMetrics, MetricsServer, NullMetrics, serve_metrics

__all__ = ["DaemonMetrics", "MetricsServer", "NullMetrics", "job_metrics_record", "publish_job_metrics",
           "serve_metrics"]
