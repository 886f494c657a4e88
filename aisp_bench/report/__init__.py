"""Tables and figures of the AISP reproduction, rebuilt from run folders on disk.

Nothing here loads a model (pandas, numpy and matplotlib only). Entry points:

* :func:`~aisp_bench.report.tables.table1`, :func:`~aisp_bench.report.tables.table2`,
  :func:`~aisp_bench.report.tables.table3`, :func:`~aisp_bench.report.tables.lambda_sweep`
  (DataFrames) and their writers;
* :func:`~aisp_bench.report.figures.write_figure2`,
  :func:`~aisp_bench.report.figures.write_compute` (PNGs with the plotted numbers as CSV);
* ``python -m aisp_bench.report {table1,table2,table3,figure2,compute,lambda_sweep,all}``.
"""

from .io import Run, discover_judge, discover_runs, read_records
from .tables import lambda_sweep, table1, table2, table3, winrate_table

__all__ = ["Run", "discover_runs", "discover_judge", "read_records", "table1", "table2", "table3",
           "winrate_table", "lambda_sweep"]
