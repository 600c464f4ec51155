"""``apbatch apdb``: create the Alert Production Database."""

from __future__ import annotations

from pathlib import Path

from ..config import ApbatchConfig

__all__ = ["create"]


def create(cfg: ApbatchConfig, url: str | None = None, config_file: str | None = None) -> tuple[str, Path]:
    """Create the APDB (schema from ``lsst-sdm-schemas``) and write its dax_apdb config file.

    Parameters
    ----------
    cfg : `ApbatchConfig`
        Configuration; ``apdb.url`` and ``apdb.config_file`` are the defaults; ``apdb.replication``
        says whether stores are recorded for the PPDB.
    url : `str`, optional
        SQLAlchemy URL overriding ``apdb.url`` (SQLite paths are relative to ``root``).
    config_file : `str`, optional
        Path overriding ``apdb.config_file``.

    Returns
    -------
    url, config_path : `str`, `Path`
        Where the database and its config file are.

    Raises
    ------
    BadInputError
        Raised if the URL is unsupported or the config file exists.
    """
    from ..job.apdb import create_apdb

    db_url = cfg.sqlalchemy_url(url or cfg.apdb.url)
    path = cfg.path(config_file or cfg.apdb.config_file)
    create_apdb(db_url, path, replication=cfg.apdb.replication)
    return db_url, path
