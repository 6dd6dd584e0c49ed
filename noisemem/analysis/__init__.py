"""Analysis of study stores in pandas: tidy tables with 95% intervals, figures, the report.

Reads what :mod:`noisemem.studies` writes; neither the engine nor the service imports it.

* :mod:`~noisemem.analysis.intervals`: chunks pooled exactly, the jackknife over chunks.
* :mod:`~noisemem.analysis.compare`: Monte Carlo E[M] against the exact expectation and
  every stored prediction; the noise part and R; corrections at each run's parameters.
* :mod:`~noisemem.analysis.laws`: sweep families and their laws (batch size, beta,
  AdamW's anti-regularization).
* :mod:`~noisemem.analysis.figure1`: l_inf slopes against h and each config's regime.
* :mod:`~noisemem.analysis.claims`: the paper's claims next to the numbers.
* :mod:`~noisemem.analysis.results`: every table at once, and ``summary.parquet``.
* :mod:`~noisemem.analysis.figures`, :mod:`~noisemem.analysis.html`: PNG figures, HTML.
* :mod:`~noisemem.analysis.report`: :func:`~noisemem.analysis.report.write_report` writes
  ``report.html`` and ``summary.parquet`` into a store.
"""
