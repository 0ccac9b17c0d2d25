"""What a command does below its options: a run's repeats and records, a sweep and its resume, the
pre-run checks, the redshift catalogue of ``predict``."""
