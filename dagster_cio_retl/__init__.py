"""cio-retl's Dagster integration (the ``dagster`` extra): model files as assets, their
checks, schedules, the automation sensor and the resources.

The engine (``cio_retl``) never imports Dagster; everything Dagster-specific lives here.
"""
