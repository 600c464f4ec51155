"""Products made after (or beside) the night's jobs.

`apbatch.products.ppdb` copies the APDB's replica chunks into the Prompt Products Database
(``lsst-dax-ppdb``); `apbatch.products.embargo` releases the jobs' outputs from the embargo
repository to the prompt repository.
"""

from __future__ import annotations

__all__: list[str] = []
