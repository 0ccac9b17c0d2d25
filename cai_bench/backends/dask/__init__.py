"""``dask``: the run's partitions as Dask tasks, on an embedded LocalCluster, an existing scheduler, or workers
that dask-jobqueue puts on SLURM (``backend.py``)."""
