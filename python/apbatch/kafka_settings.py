"""The one place where a `apbatch.config.KafkaConfig` becomes librdkafka (confluent-kafka) settings.

Both Kafka clients of apbatch use it: the daemon's event consumer
(`apbatch.sources.kafka`) and the jobs' alert producer (`apbatch.job.alert_sinks`). Each
adds only what is its own (group id and commit policy; idempotence and acks).

Secrets come only from the environment variables named in the config
(``kafka.username_env``, ``kafka.password_env``) or from ``kafka.password_file``; never from
a command line or the config itself, so that nobody reading ``squeue``/``condor_q`` or a
job's rendered script sees them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config_sources import read_secret_file
from .errors import BadInputError

__all__ = ["kafka_settings"]


def kafka_settings(kafka, environ: Mapping[str, str] | None = None, root: str | Path | None = None
                   ) -> dict[str, Any]:
    """librdkafka settings of the cluster ``kafka`` describes.

    Parameters
    ----------
    kafka : `apbatch.config.KafkaConfig`
        The cluster: bootstrap servers, security protocol, SASL mechanism and where the
        credentials are.
    environ : `~collections.abc.Mapping`, optional
        Environment to read the credentials from; default `os.environ`.
    root : `str` or `Path`, optional
        Directory a relative ``kafka.password_file`` is resolved against (the config's
        ``root``, as for every other configured path); default: the current directory.

    Returns
    -------
    settings : `dict`
        ``bootstrap.servers``, ``security.protocol`` and, with SASL, ``sasl.mechanism``,
        ``sasl.username`` and ``sasl.password``.

    Raises
    ------
    BadInputError
        Raised if SASL is configured and the username or password is not available, or the
        password file cannot be read.
    """
    environ = os.environ if environ is None else environ
    settings: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers,
                                "security.protocol": kafka.security_protocol}
    if not kafka.sasl_mechanism:
        return settings
    settings["sasl.mechanism"] = kafka.sasl_mechanism
    user = environ.get(kafka.username_env)
    password = environ.get(kafka.password_env)
    if not password and kafka.password_file:
        password = read_secret_file("kafka.password_file", kafka.password_file, root)
    if not user:
        raise BadInputError("kafka.username_env", f"${kafka.username_env} is not set", "export it")
    if not password:
        raise BadInputError("kafka.password_env", f"${kafka.password_env} is not set and no password_file",
                            "export it or set kafka.password_file")
    settings["sasl.username"], settings["sasl.password"] = user, password
    return settings
