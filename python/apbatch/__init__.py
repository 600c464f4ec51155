"""apbatch: run Rubin-style Alert Production as batch jobs, one job per CCD."""

__all__ = ["__version__"]

__version__ = "0.1.0"
