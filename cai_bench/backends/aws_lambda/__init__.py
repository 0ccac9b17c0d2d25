"""The ``lambda`` backend: AWS Lambda fan-out over S3, on AWS or against the local emulator (``--emulate``).

driver.py         the backend: its options, the services a run talks to, staging data and model in S3, the record
invoke.py         the direct transport: invokers making synchronous Invoke calls, throttling retried with backoff
stepfunctions.py  the paper's transport: executions of a Step Functions Distributed Map, their history
wire.py           what crosses S3 between the driver and the function: the event, result keys, replies, errors
handler.py        the function itself: the one worker loop over the units of its event, results to S3
provision.py      the function and its state machine on a real account: deploy, status, destroy, the tag
image.py          the function's container image: docker build and the push to ECR
runtime_api.py    Lambda's Runtime API for one emulated execution environment (awslambdaric pulls from it)
image_python.py   the image's dependency set (the Dockerfile's lists) as an interpreter for emulated functions
emulator.py       Lambda's Invoke HTTP API on loopback, its execution environments, and local S3 (moto)
report_log.py     REPORT log lines, parsed and written
pricing.py        the dated price table and the cost of a run, or of invocations before they run
"""
