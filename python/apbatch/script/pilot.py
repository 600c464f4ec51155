"""``apbatch pilot``: a warm pilot of the pilot backend (`apbatch.backends.pilot`).

A pilot claims one queued CCD at a time from the backend's state directory and runs it
in-process with `apbatch.script.process_ccd.process_ccd`, exactly as ``apbatch process-ccd``
would (same exit codes, stage marks, ap_metrics, log file per item), but with what is
per-process kept warm between items (:class:`WarmDeps`): the imports, the butler (one per
repository), the APDB connection, the alert schema/builder, spool and sink, and the
calibrations read (`apbatch.script.pilot_calibs`: an LRU of at most ``backend.calib_cache``
calibrations and ``backend.calib_cache_mib`` MiB keyed by dataset id, so the same detector's
bias and flat are read and decompressed once; their pixels are kept in files, not in the
pilot's memory, and each CCD gets its own copy, which it frees after ISR as a per-CCD job
does: a pilot's peak memory is then a per-CCD job's plus what stays open). What is per CCD is new
for every item: the distributor client, the APDB association and its preloaded region, the
job's `StageClock`, `Prepared` data, result. After an item that failed with a code other
than 0, 2 or 3 the warm state is dropped (a connection may be broken) and opened again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..config import ApbatchConfig, PilotBackendConfig, load_config
from ..errors import ApbatchError, BadInputError, ExitCode, SchedulerError, exit_code_of
from .pilot_calibs import SpilledCalibCache

__all__ = ["WarmDeps", "exit_code_of", "peak_rss_mib", "rss_mib", "run_item", "run_pilot"]

log = logging.getLogger(__name__)


def _vm(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return 0.0


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux ``/proc``; 0 elsewhere)."""
    return _vm("VmRSS")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (``VmHWM``), MiB (0 where unknown)."""
    return _vm("VmHWM")


def _cpu_seconds() -> float:
    """User + system CPU of this process so far (all its threads), seconds."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


class _CachingButlerIO:
    """A `ButlerIO` whose ``read_calib`` keeps calibrations by dataset id in a `SpilledCalibCache`
    (``size`` of them, ``budget_mib`` MiB at most): each CCD gets its own copy."""

    def __init__(self, inner, size: int, budget_mib: float = 512.0):
        self._inner = inner
        self.calibs = SpilledCalibCache(size, budget_mib)
        self.calib_hits = 0

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def read_calib(self, ref):
        calib = self.calibs.get(ref.id)
        if calib is not None:
            self.calib_hits += 1
            return calib
        calib = self._inner.read_calib(ref)
        self.calibs.put(ref.id, calib)
        return calib

    def close(self) -> None:
        self.calibs.close()


class WarmDeps:
    """What a pilot keeps open between CCDs, and the per-CCD `JobDeps` built from it.

    Parameters
    ----------
    calib_cache : `int`
        Calibrations kept read per butler (0: none).
    calib_cache_mib : `float`
        Bytes of those calibrations kept at most, MiB (`SpilledCalibCache`).

    Notes
    -----
    Keys include every setting a resource depends on, so items of nights with different
    configs never share the wrong one. Lifetime: one pilot; not thread-safe.
    """

    def __init__(self, calib_cache: int = 4, calib_cache_mib: float = 512.0):
        self.calib_cache, self.calib_cache_mib = calib_cache, calib_cache_mib
        self._cache: dict[Any, Any] = {}

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def deps(self, cfg: ApbatchConfig, work):
        """The `JobDeps` of one CCD: warm butler, APDB, builder, spool, sink; new distributor
        client and association. Raises what `make_deps` raises (exits 2 and 4)."""
        from ..butler.io import ButlerIO
        from ..distributor.client import DistributorClient
        from ..job.task import JobDeps
        from .process_ccd import _open_butler

        repo = cfg.path(cfg.job.repo).absolute()
        inputs = cfg.job.input_collection.format(instrument=work.instrument)
        butler = self._get(("butler", str(repo)), lambda: _open_butler(repo, "job.repo"))
        butler_io = self._get(("butler_io", str(repo), work.instrument, inputs),
                              lambda: _CachingButlerIO(ButlerIO(butler, work.instrument, collections=inputs),
                                                       self.calib_cache, self.calib_cache_mib))
        alerts = None
        if cfg.job.associate and work.intent == "science":
            alerts = self._alert_stage(cfg)
            alerts.check()
        return JobDeps(butler_io=butler_io, distributor=DistributorClient.from_location(work.distributor),
                       alerts=alerts)

    def _alert_stage(self, cfg: ApbatchConfig):
        from ..job.alert_schemas import alert_schema
        from ..job.alert_sinks import AlertSpool, make_sink
        from ..job.alerts import AlertBuilder
        from ..job.apdb import open_apdb
        from .process_ccd import AlertStage

        a = cfg.alerts
        apdb = self._get(("apdb", str(cfg.path(cfg.apdb.config_file).absolute())),
                         lambda: open_apdb(cfg.path(cfg.apdb.config_file)))
        builder = self._get(("builder", a.schema_version, a.cutout_size, a.history_days),
                            lambda: AlertBuilder(schema=alert_schema(a.schema_version),
                                                 cutout_size=a.cutout_size, history_days=a.history_days))
        spool = self._get(("spool", str(cfg.path(a.spool_dir).absolute())),
                          lambda: AlertSpool(cfg.path(a.spool_dir)))
        sink = self._get(("sink", a.model_dump_json(), cfg.kafka.model_dump_json()), lambda: make_sink(cfg))

        class _PilotAlertStage(AlertStage):
            def close(self) -> None:  # the sink is the pilot's: closed when the pilot ends
                pass

        return _PilotAlertStage(cfg, apdb=apdb, builder=builder, spool=spool, sink=sink)

    def close(self) -> None:
        """Close the sinks and forget everything (the next CCD opens again)."""
        for key, value in self._cache.items():
            if key[0] in ("sink", "butler_io"):  # the sinks; the calibration cache's files
                with contextlib.suppress(Exception):
                    value.close()
        self._cache.clear()


@contextlib.contextmanager
def _item_output(log_file: Path, job_id: str):
    """Send logging, stdout and stderr to the item's ``out.log`` and set ``APBATCH_JOB_ID``."""
    from ..logs import _HANDLER_NAME, JobContextFilter

    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)  # job logs: not for all
    root = logging.getLogger()
    ours = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    old_env = os.environ.get("APBATCH_JOB_ID")
    with open(fd, "a", buffering=1) as out:
        extra = None
        if isinstance(ours, logging.StreamHandler):
            old_stream = ours.setStream(out)
        else:  # no apbatch handler (embedded, tests): one for the item
            extra = logging.StreamHandler(out)
            extra.addFilter(JobContextFilter())
            extra.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(extra)
        os.environ["APBATCH_JOB_ID"] = job_id
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                yield out
        finally:
            if extra is not None:
                root.removeHandler(extra)
            elif isinstance(ours, logging.StreamHandler):
                ours.setStream(old_stream)
            if old_env is None:
                os.environ.pop("APBATCH_JOB_ID", None)
            else:
                os.environ["APBATCH_JOB_ID"] = old_env


def run_item(spec: dict[str, Any], warm: WarmDeps, configs: dict[str, ApbatchConfig]) -> int:
    """Run one claimed work item in this process; returns its exit code (never raises for the CCD).

    ``spec`` is the item's ``job.json``; ``configs`` caches loaded config files by path.
    """
    from ..logs import clear_job_context
    from ..work import CcdWork
    from .process_ccd import process_ccd

    error: BaseException | None = None
    deps = None
    try:
        if "error" in spec:
            raise BadInputError("job.json", spec["error"], "resubmit the CCD")
        path = spec["config"]
        if path not in configs:
            configs[path] = load_config([path])
        cfg = configs[path]
        work = CcdWork.from_dict(spec["work"])
        deps = warm.deps(cfg, work)
        result = process_ccd(cfg, work, deps=deps)
        print(json.dumps(result, default=str))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the per-CCD job's boundary: every way it ends is an exit code
        error = exc
        text = " ".join(str(exc).split())
        print(f"error: {text}" if isinstance(exc, ApbatchError)
              else f"error: unexpected {type(exc).__name__}: {text}")
        log.debug("item failed", exc_info=True)
    finally:
        clear_job_context()
        if deps is not None:
            deps.distributor.close()  # the item's downloaded raws: the pilot outlives them
    code = exit_code_of(error)
    if code not in (0, int(ExitCode.BAD_INPUT), int(ExitCode.RAW_TIMEOUT)):
        warm.close()  # a broken connection must not reach the next CCD
    return code


def _end_on_sigterm(rec: dict[str, Any]) -> Any:
    """SIGTERM: an idle pilot ends cleanly (recorded "ended"); one running an item dies at once,
    as a per-CCD process would (the item is then cancelled, or lost: never done)."""
    if threading.current_thread() is not threading.main_thread():
        return None  # signal handlers belong to the main thread (a pilot run by a test's thread)

    def handler(signum, frame):
        if rec["state"] == "running":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)  # the previous handler, restored at the end


def run_pilot(cfg: ApbatchConfig, *, poll: float = 0.1, max_items: int | None = None) -> dict[str, Any]:
    """The pilot: claim, run, record, until idle for ``backend.idle_timeout``, past
    ``backend.max_lifetime``, or ``max_items`` done. Returns the pilot's final record.

    Raises
    ------
    BadInputError
        Raised if the configured backend is not ``pilot``, or ``APBATCH_PILOT_ID`` (set by a
        batch launcher) is not a batch pilot id.
    """
    from ..backends.local import _locked, _proc_start_ticks, _write_atomic
    from ..backends.pilot import PilotBackend, claim_next, lifetime_seconds, register_pilot
    from ..backends.pilot_launch import parse_pilot_id
    from ..job.steps.memory import keep_freed_memory

    settings = cfg.backend
    if not isinstance(settings, PilotBackendConfig):
        raise BadInputError("config backend.kind", f"is {settings.kind!r}: a pilot needs the pilot backend",
                            "set backend.kind: pilot")
    state_dir = cfg.path(settings.log_dir).absolute()
    batch = parse_pilot_id(os.environ.get("APBATCH_PILOT_ID"))  # a Slurm / HTCondor pilot: its job id
    (state_dir / "pilots").mkdir(parents=True, exist_ok=True)
    (state_dir / "queue").mkdir(exist_ok=True)
    keep_freed_memory()
    pid, host = os.getpid(), socket.gethostname()
    started = time.time()
    rec: dict[str, Any] = {"pid": pid, "ticks": _proc_start_ticks(pid), "host": host, "state": "idle",
                           "item": None, "done": 0, "failed": 0, "started": started, "last_active": started,
                           "rss_mib": rss_mib(), "peak_rss_mib": peak_rss_mib(), "items": []}
    if batch is not None:
        rec.update(pilot=f"{batch[0]}-{batch[1]}", batch=batch[0], batch_id=batch[1])
    rec_path = register_pilot(state_dir, rec)
    rec["pilot"] = rec_path.stem
    identity = {"pid": pid, "ticks": rec["ticks"], "pilot": rec["pilot"], "host": host,
                **({"batch": batch[0], "batch_id": batch[1]} if batch else {})}
    warm = WarmDeps(settings.calib_cache, settings.calib_cache_mib)
    configs: dict[str, ApbatchConfig] = {}
    previous = _end_on_sigterm(rec)
    deadline = started + lifetime_seconds(settings)
    try:
        while True:
            now = time.time()
            why = ("end of its lifetime" if now >= deadline
                   else f"RSS {rec['rss_mib']:.0f} MiB over backend.max_rss_mib"
                   if rec["items"] and rec["rss_mib"] > settings.max_rss_mib  # never before a CCD: no loop
                   else "item limit" if max_items is not None and rec["done"] + rec["failed"] >= max_items
                   else f"idle for {settings.idle_timeout:g} s"
                   if now - rec["last_active"] >= settings.idle_timeout else "")
            if why:
                with _locked(state_dir / "queue.lock"):  # no submit queues work for a leaving pilot
                    claimed = claim_next(state_dir, identity) if why.startswith("idle") else None
                    if claimed is None:
                        rec.update(state="ended", item=None, reason=why, ended=now)
                        register_pilot(state_dir, rec)
                        if not why.startswith("idle") and any((state_dir / "queue").iterdir()):
                            try:
                                PilotBackend(cfg)._ensure_runner()  # a fresh pilot for the work left
                            except SchedulerError as exc:  # the daemon's next status tries again
                                log.warning("pilot %s: cannot start a fresh pilot: %s", rec["pilot"], exc)
                        return rec
            else:
                claimed = claim_next(state_dir, identity)
            if claimed is None:
                time.sleep(poll)
                continue
            job_id, spec = claimed
            job_dir = state_dir / "jobs" / job_id
            rec.update(state="running", item=job_id)  # from here, SIGTERM kills at once (a cancel)
            register_pilot(state_dir, rec)
            if (job_dir / "cancel").exists():
                code = 143  # cancelled between the queue and the claim: never run
            else:
                cpu0 = _cpu_seconds()
                with _item_output(job_dir / "out.log", job_id):
                    code = run_item(spec, warm, configs)
                item = [job_id, code, round(_cpu_seconds() - cpu0, 3), rss_mib()]  # id, exit, CPU s, RSS MiB
                rec["items"] = [*rec["items"], item][-50:]
            _write_atomic(job_dir / "exit", str(code))
            rec["done" if code == 0 else "failed"] += 1
            rec.update(state="idle", item=None, last_active=time.time(), rss_mib=rss_mib(),
                       peak_rss_mib=peak_rss_mib())
            register_pilot(state_dir, rec)
            log.info("pilot %s: %s exited %d (%d done, %d failed, RSS %.0f MiB)", rec["pilot"], job_id, code,
                     rec["done"], rec["failed"], rec["rss_mib"])
    finally:
        warm.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if rec["state"] != "ended":  # an exception in the pilot itself: say so
            stopped = sys.exc_info()[0]
            rec.update(state="ended", reason="terminated" if stopped is SystemExit
                       else f"stopped: {stopped.__name__ if stopped else '?'}",
                       ended=time.time())
            register_pilot(state_dir, rec)
