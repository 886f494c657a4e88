"""Tables and figures of the AISP reproduction, rebuilt from run folders on disk.

Nothing here loads a model (pandas, numpy and matplotlib only):

* :mod:`~aisp_bench.report.table1` (Table 1), :mod:`~aisp_bench.report.tables`
  (Tables 2-3, the λ sweep, the method comparison): DataFrames and their writers;
* :mod:`~aisp_bench.report.figures` (Figure 2, the equal-compute view) on the curves of
  :mod:`~aisp_bench.report.curves`: PNGs with the plotted numbers as CSV;
* ``python -m aisp_bench.report target=...`` (see :mod:`aisp_bench.report.__main__`).
"""
