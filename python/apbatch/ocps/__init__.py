"""OCS-controlled processing (OCPS): ``processData`` requests, pipelines, completion events.

`apbatch.ocps.model` holds the request types and the `OcpsService` protocol the HTTP side
(`apbatch.ocps.app`) calls; `apbatch.ocps.service` implements it over a persistent request
store (`apbatch.ocps.store`), a registry of pipelines (`apbatch.ocps.pipelines`), a background
runner that submits the per-CCD jobs through the existing backends and ledger
(`apbatch.ocps.runner`), and the Kafka completion and telemetry events
(`apbatch.ocps.events`).
"""

from __future__ import annotations

__all__: list[str] = []
