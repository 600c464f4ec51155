"""Creating and opening the APDB (``lsst-dax-apdb``, schema from ``lsst-sdm-schemas``)."""

from __future__ import annotations

from pathlib import Path

from ..atomic import replacing
from ..errors import BadInputError

__all__ = ["create_apdb", "open_apdb"]


def create_apdb(url: str, config_path: str | Path, *, replication: bool = False):
    """Create an APDB with the ``lsst-sdm-schemas`` schema and write its config file.

    Parameters
    ----------
    url : `str`
        SQLAlchemy URL: ``sqlite:////abs/path.sqlite3`` or ``postgresql+psycopg2://...``
        (a plain ``postgresql://`` is taken as psycopg2).
    config_path : `str` or `Path`
        Where to write the dax_apdb config (YAML); must not exist yet.
    replication : `bool`
        Also record every store's replica chunk, for the PPDB (`apbatch.products.ppdb`).

    Returns
    -------
    config : `lsst.dax.apdb.ApdbSqlConfig`
        The configuration that was written.

    Raises
    ------
    BadInputError
        Raised if the URL scheme is not supported or the config file already exists.
    """
    from lsst.dax.apdb import ApdbSql

    config_path = Path(config_path)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "postgresql":
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    elif scheme not in ("sqlite", "postgresql+psycopg2"):
        raise BadInputError("apdb.url", f"unsupported database URL scheme {scheme or url!r}",
                            "use sqlite:///PATH or postgresql+psycopg2://USER@HOST/DB")
    if config_path.exists():
        raise BadInputError("apdb.config_file", f"{config_path} already exists",
                            "remove it or choose another --config-file")
    if scheme == "sqlite":
        db_file = url[len("sqlite:///"):]
        if db_file and ":memory:" not in db_file:
            Path(db_file).parent.mkdir(parents=True, exist_ok=True)
    try:
        config = ApdbSql.init_database(db_url=url, dia_object_index="last_object_table",
                                       enable_replica=replication)
    except Exception as exc:  # a database the user pointed us at refused: one line, their fix
        raise BadInputError("apdb.url", f"cannot create the APDB: {str(exc).splitlines()[0]}",
                            "check the URL, credentials and that the server is running") from None
    with replacing(config_path) as tmp:
        config.save(str(tmp))
    return config


def open_apdb(config_path: str | Path):
    """Open the APDB described by a config file written by :func:`create_apdb`.

    Raises
    ------
    BadInputError
        Raised if the file does not exist.
    """
    from lsst.dax.apdb import Apdb

    if not Path(config_path).is_file():
        raise BadInputError("apdb.config_file", f"no APDB config {str(config_path)!r}",
                            "create one with: apbatch apdb create")
    return Apdb.from_uri(str(config_path))
