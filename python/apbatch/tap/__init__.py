"""The TAP service over the PPDB tables and ObsCore (``apbatch tap serve``).

`apbatch.tap.schema` (served tables, VOSI tables, indexes), `apbatch.tap.adql` (ADQL -> SQL),
`apbatch.tap.validity` (reproducible queries), `apbatch.tap.votable` (documents),
`apbatch.tap.service` (one query) and `apbatch.tap.app` (HTTP).
"""

__all__: list[str] = []
