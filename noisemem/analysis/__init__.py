"""Analysis of study stores in pandas: the comparison tables and the report.

Reads what :mod:`noisemem.studies` writes; neither the engine nor the service imports it.
"""
