"""Tests for apbatch.config: defaults, YAML, environment overrides and bad values."""

import pytest
from apbatch.config import HTCondorBackendConfig, SlurmBackendConfig, load_config
from apbatch.errors import BadInputError


def test_defaults_are_the_embedded_setup():
    cfg = load_config(environ={})
    assert cfg.backend.kind == "local"
    assert cfg.ledger.url.startswith("sqlite:///")
    assert cfg.alerts.sink == "file"
    assert cfg.job.raw_timeout == 120.0


def test_yaml_then_env_then_overrides(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("backend:\n  kind: slurm\n  partition: ap\nevents:\n  max_age: 30\n")
    cfg = load_config(f, environ={"APBATCH_BACKEND__TIME_LIMIT": "00:05:00", "APBATCH_ROOT": "/srv/ap"},
                      overrides={"events": {"mode": "batch"}})
    assert isinstance(cfg.backend, SlurmBackendConfig)
    assert cfg.backend.partition == "ap" and cfg.backend.time_limit == "00:05:00"
    assert cfg.events.max_age == 30 and cfg.events.mode == "batch"
    assert cfg.root == "/srv/ap"
    assert cfg.path("ledger.db").as_posix() == "/srv/ap/ledger.db"


def test_config_from_environment_variable(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backend: {kind: htcondor, max_retries: 5}\n")
    cfg = load_config(environ={"APBATCH_CONFIG": str(f)})
    assert isinstance(cfg.backend, HTCondorBackendConfig) and cfg.backend.max_retries == 5


def test_secrets_in_env_are_not_config_fields():
    cfg = load_config(environ={"APBATCH_KAFKA_PASSWORD": "hunter2"})
    assert "hunter2" not in cfg.model_dump_json()


def test_sqlite_urls_resolve_against_root(tmp_path):
    cfg = load_config(environ={"APBATCH_ROOT": str(tmp_path)})
    assert cfg.sqlalchemy_url("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"
    assert cfg.sqlalchemy_url("postgresql://u@localhost/db") == "postgresql://u@localhost/db"


@pytest.mark.parametrize(
    "text, field",
    [
        ("backend: {kind: pbs}\n", "config backend"),
        ("events: {max_age: -1}\n", "config events.max_age"),
        ("ledger: {nope: 1}\n", "config ledger.nope"),
        ("job: {threads: 0}\n", "config job.threads"),
        ("backend: {kind: slurm, time_limit: ten minutes}\n", "config backend.slurm.time_limit"),
        ("backend: {kind: slurm, time_limit: '00:00'}\n", "config backend.slurm.time_limit"),
        ("job: {pointing_pad_arcsec: -5}\n", "config job.pointing_pad_arcsec"),
        ("- a\n- b\n", "--config"),
        ("backend: [unclosed\n", "--config"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, field):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(BadInputError) as info:
        load_config(f, environ={})
    assert str(info.value).startswith(field)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(BadInputError, match="--config: no such file"):
        load_config(tmp_path / "absent.yaml", environ={})


def _one_line_error(call) -> str:
    with pytest.raises(BadInputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",  # binary, not UTF-8
    b"\x00\x01\x02binary\x00",  # UTF-8 (NULs), not YAML
    b"backend: " + b"[" * 5000,  # nested past any parser's patience
    b"\xef\xbb\xbf- a\n",  # a BOM and a list, not a mapping
])
def test_unreadable_config_file_is_one_line_naming_config(tmp_path, content):
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    message = _one_line_error(lambda: load_config(f, environ={}))
    assert message.startswith(f"--config: {f}") and "YAML file" in message


def test_config_path_that_is_a_directory(tmp_path):
    message = _one_line_error(lambda: load_config(tmp_path, environ={}))
    assert message.startswith(f"--config: cannot read {tmp_path}")


def test_cli_exits_2_with_one_line_for_a_binary_config(tmp_path, capsys):
    from apbatch.cli import main
    from apbatch.errors import ExitCode

    f = tmp_path / "bad.yaml"
    f.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SystemExit) as info:
        main(["status", "--config", str(f)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == ExitCode.BAD_INPUT
    assert len(err) == 1 and err[0].startswith("error: --config: ")


# ------------------------------------------------------------- backend fields from the environment
def test_backend_env_field_applies_to_the_configured_kind(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backend: {kind: slurm}\n")
    cfg = load_config(f, environ={"APBATCH_BACKEND__TIME_LIMIT": "01:00:00"})  # YAML 1.1 would say 3600
    assert isinstance(cfg.backend, SlurmBackendConfig) and cfg.backend.time_limit == "01:00:00"
    # a field the default (local) backend has needs no KIND
    assert load_config(environ={"APBATCH_BACKEND__MAX_WORKERS": "3"}).backend.max_workers == 3


def test_backend_env_field_the_kind_lacks_names_the_variable_and_the_fix():
    message = _one_line_error(lambda: load_config(environ={"APBATCH_BACKEND__PARTITION": "ap"}))
    assert message.startswith("APBATCH_BACKEND__PARTITION: the configured backend is 'local'")
    assert "set APBATCH_BACKEND__KIND to slurm" in message
    message = _one_line_error(lambda: load_config(environ={"APBATCH_BACKEND__TIME_LIMIT": "00:20:00"}))
    assert message.startswith("APBATCH_BACKEND__TIME_LIMIT: ")
    assert "APBATCH_BACKEND__KIND to one of" in message  # slurm and htcondor have one
    cfg = load_config(environ={"APBATCH_BACKEND__TIME_LIMIT": "00:20:00", "APBATCH_BACKEND__KIND": "slurm"})
    assert cfg.backend.time_limit == "00:20:00"


def test_slurm_time_limit_takes_what_sbatch_takes():
    for text in ("30", "10:00", "01:00:00", "1-12", "2-00:30:00", "UNLIMITED", "infinite"):
        cfg = load_config(overrides={"backend": {"kind": "slurm", "time_limit": text}}, environ={})
        assert cfg.backend.time_limit == text


def test_backend_file_field_the_kind_lacks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backend: {partition: ap}\n")
    message = _one_line_error(lambda: load_config(f, environ={}))
    assert message.startswith("config backend.partition: the configured backend is 'local'")
    assert "set backend.kind to slurm" in message
    f.write_text("backend: {max_workers: 2}\n")  # the default kind has it: no kind needed
    assert load_config(f, environ={}).backend.max_workers == 2


def test_env_strings_stay_strings_and_lists_stay_lists():
    cfg = load_config(environ={"APBATCH_JOB__INPUT_COLLECTION": "010", "APBATCH_JOB__RAW_TIMEOUT": "30",
                               "APBATCH_JOB__COMMAND": "[apbatch, process-ccd]"})
    assert cfg.job.input_collection == "010" and cfg.job.raw_timeout == 30.0
    assert cfg.job.command == ["apbatch", "process-ccd"]


# ------------------------------------------------------------------- detector subsets at start-up
@pytest.mark.parametrize(("detectors", "field", "problem"), [
    ({"LSSTCam": [999]}, "events.detectors.LSSTCam", "LSSTCam has no detector 999"),
    ({"LSSTCam": [191]}, "events.detectors.LSSTCam", "is a wavefront CCD"),
    ({"LSSTCam": []}, "events.detectors.LSSTCam", "is empty"),
    ({"HSC": [1]}, "events.detectors.HSC", "HSC"),
    ({"LSSTCam": [1], "lsstcam": [2]}, "events.detectors.LSSTCam", "given twice"),
])
def test_bad_detector_subset_fails_at_load(detectors, field, problem):
    message = _one_line_error(lambda: load_config(environ={}, overrides={"events": {"detectors": detectors}}))
    assert message.startswith(f"config {field}: ") and problem in message


def test_detector_subset_keyed_by_butler_name():
    cfg = load_config(environ={}, overrides={"events": {"detectors": {"lsstcam": [94, 0]}}})
    assert cfg.events.detectors == {"LSSTCam": [94, 0]}


# ---------------------------------------------------------------- every field is read somewhere
# Fields read in a way the attribute scan below cannot see, each with why:
_READ_BY_NAME = {
    "kind": "the discriminator of BackendConfig, and read as .kind everywhere",
    # backends/base.py: getattr(self.settings, "command_timeout", 30.0), as only Slurm's section has it
    "command_timeout": "read with getattr by the shared backend base class",
}


def _fields(model, prefix=""):
    """(dotted name, attribute name) of every field of a pydantic model class, recursively."""
    import typing

    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", name
        stack = [info.annotation]
        while stack:  # unions (the backends) and Annotated[...] wrappers
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                yield from _fields(tp, f"{prefix}{name}.")
            else:
                stack += [a for a in typing.get_args(tp) if not isinstance(a, (str, int, float))]


def test_every_config_field_is_read_outside_config_py():
    """A config field nothing reads is a setting that silently does nothing.

    An attribute read (``cfg.job.output_run``, ``settings.partition``) counts; a method call of
    the same name (``ds.output_run(...)``) does not.
    """
    import re
    from pathlib import Path

    import apbatch
    from apbatch.config import ApbatchConfig

    package = Path(apbatch.__file__).parent
    source = "\n".join(p.read_text() for p in package.rglob("*.py") if p.name != "config.py")
    unread = sorted({dotted for dotted, attr in _fields(ApbatchConfig)
                     if attr not in _READ_BY_NAME and not re.search(rf"\.{attr}\b(?!\s*\()", source)})
    assert unread == [], f"config fields read nowhere in python/apbatch: {unread}"


def test_field_scan_sees_nested_and_union_fields():
    from apbatch.config import ApbatchConfig

    names = {dotted for dotted, _ in _fields(ApbatchConfig)}
    assert {"alerts.schema_version", "apdb.region_padding_arcsec", "job.output_run", "backend.partition",
            "backend.schedd_name", "kafka.password_file"} <= names
