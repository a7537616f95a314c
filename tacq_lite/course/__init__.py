"""Course tools: exercise checkers (exercises), student copies of the notebooks (student),
interactive plots and the course colour per method (explore), checks of a notebook's parameters
(params), papermill sweeps over a notebook's parameters (sweep) and where
their runs execute: this process, local worker processes or a Dask cluster (executors).
"""
