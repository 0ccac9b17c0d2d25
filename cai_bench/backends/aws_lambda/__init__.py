"""The ``lambda`` backend: AWS Lambda fan-out over S3, on AWS or against the local emulator (``--emulate``).

driver.py      the backend and its transport on the dispatcher: invocations, retries of throttling, REPORT
               lines and cost in the record
handler.py     the function itself: the one worker loop over the units of its event, results to S3
runtime.py     one emulated execution environment (a process importing the handler once)
emulator.py    Lambda's Invoke HTTP API on loopback, its execution environments, and local S3 (moto)
report_log.py  REPORT log lines, parsed and written
pricing.py     the dated price table and the cost of a run
"""

from cai_bench.backends.aws_lambda.driver import LambdaBackend


def create() -> LambdaBackend:
    return LambdaBackend()
