"""The HTML night report: what a night did, to look at.

`apbatch.report.data` gathers the night (ledger rows, the jobs' ``ap_metrics`` from the butler,
the alert files) into plain dataclasses; `apbatch.report.plots` draws them with matplotlib
(PNG bytes); `apbatch.report.html` assembles one self-contained page (images inline, no
network). ``apbatch night report --html DIR`` and ``apbatch demo`` write it.
"""

from __future__ import annotations

__all__: list[str] = []
