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
