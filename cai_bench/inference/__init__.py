"""What runs in a worker: its torch-free vocabulary (``worker``), the torch engine, the export and the
exported-model runtimes, the one worker loop, ``--runtime auto``'s probe, the workers' closing collectives."""
