"""``fedsq-bench``: the grid (``grid.py``), its statistics (``stats.py``), tables and plots (``report.py``),
and the experiment presets as TOML files (``conf/``)."""
