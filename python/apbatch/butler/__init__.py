"""The butler repository jobs read from and write to (``lsst.daf.butler``), and its formatters."""
