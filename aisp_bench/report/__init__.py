"""Tables and figures of the AISP reproduction, rebuilt from run folders on disk by
``python -m aisp_bench.report target=...`` (:mod:`aisp_bench.report.__main__`); nothing here
loads a model. One module per table (table1, table1_extended, tables: Tables 2-3, the λ sweep
and the method comparison, judge_bias, sensitivity); figures draws every PNG from the curves
of curves; stats: the bootstrap intervals; common: names, orders, formats and rendering.
"""
