"""``hpc --slurm``: SLURM job arrays over groups of partitions, submitted through submitit, as one transport
of the dispatcher.

Each array task is one worker: it runs the engine's worker loop over the units it was given (reading one
ahead) and appends what happens to its own JSON Lines file in the job's directory under the results directory,
which must be on a filesystem the nodes share. One line per event: ``start`` (epoch time, host), ``ready``
(weights, what the engine chose, the node's environment), ``unit`` (a finished unit, its PartitionResult in
the wire format in a file of its own beside), ``unit_failed``, then ``end``, or ``failed`` when it could not
start. A task that is killed keeps every unit it finished.

The driver follows the task files and hands what they report to the dispatcher. Units of a task that died or
failed go back to the queue; once no task of the array is left running, what waits is resubmitted as a
smaller array, up to ``--retries`` times per unit. The run's wall clock is from the first task's start to the
last task's end (the clocks of the nodes are taken to agree); the time from submission to the first start is
reported apart as queue wait.

``--slurm-executor local`` runs the same arrays with submitit's local executor: each task a process on this
machine, at most ``--array-parallelism`` at once (default: one per ``--cpus-per-task`` cores).

The package: ``task`` (what an array task runs on a node and the files it writes, which the driver follows),
``scheduler`` (squeue and sacct), ``arrays`` (the transport, submission, collection), ``options``.
"""
