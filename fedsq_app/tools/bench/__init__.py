"""``fedsq-bench`` (``cli.py``): experiment presets as TOML files (``conf/``, read by ``presets.py``), the grid
of simulated runs (``grid.py``), its paired statistics (``stats.py``), tables (``report.py``) and plots
(``plots.py``)."""
