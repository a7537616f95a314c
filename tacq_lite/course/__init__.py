"""Course tools: exercise checkers (exercises), student copies of the notebooks (student),
interactive plots (explore), papermill sweeps over a notebook's parameters (sweep) and where
their runs execute: this process, local worker processes or a Dask cluster (executors).
"""
