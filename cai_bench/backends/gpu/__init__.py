"""``gpu``: one worker process per CUDA device of this machine, all pulling partitions from one queue (the
dispatcher, through hpc's NodeTransport: pipes to processes from the fork server, which never touches CUDA).

Each device worker keeps its GPU busy:
- partitions are read, checked and decoded by ``read_ahead`` background threads straight into a pool of pinned
  host buffers, one per partition in flight, reused;
- batches span partitions (``PartitionStream``): a partition's rows fill the batch after the rows of the one
  before it, each batch is copied host-to-device on a stream of its own into one of two fixed device buffers,
  so the copy of batch k+1 overlaps the forward pass of batch k, and its outputs come back non-blocking into
  pinned memory; a partition is done when the batch with its last rows is back; magnitudes are cast to float32
  on the device;
- every batch has the same shape: a stream's last one is padded (rows of an earlier batch) and the padding's
  outputs are dropped, so a captured CUDA graph (``--cuda-graphs``) or ``torch.compile(mode="reduce-overhead")``
  replays every batch; capture and compilation happen at start-up and are timed as start-up, never as compute;
- precision ``auto`` is resolved on the device by a probe: the fastest of tf32, bf16 and fp16 that is at least
  10% faster than fp32 and within 2e-3 of it, else fp32.

Timing is by CUDA events: a partition's ``compute_s`` is its latency, from its first copy to the end of the batch
with its last rows, both on the device. Batches span partitions, so neighbours' latencies overlap and do not add
up: the device's own time is measured apart, as unions of intervals on the device's clock. Its busy time is the
union of its batches' forward passes, each batch's part shared between the partitions by rows (the record's
``busy_s``: the parts add up to the device's busy time); its active time is the union of the partitions'
latencies, each partition adding what it extends that union by. ``device_stats`` holds both, with the
host-to-device copies, the bytes copied, and the device's peak memory since start-up. The same code runs on the CPU
device (streams and events become synchronous timers), which is how the tests check it here:
``backend.run_devices(plan, emit, ["cpu"])``.

torch (and the engine and model modules, which import it) is imported inside the functions that use it, so
that choosing the backend or listing its options never imports torch.
"""
