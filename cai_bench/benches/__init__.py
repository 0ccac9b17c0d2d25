"""The benchmark scripts, each a ``python -m`` entry point of the Makefile: the CPU runtimes against the
reference loop, one GPU, the Lambda fan-out, Lambda cold starts, the comm channels."""
