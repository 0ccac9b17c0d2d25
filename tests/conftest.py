from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The suite's workers (pytest-xdist) and the processes its tests start share the cores: an OpenMP thread of one
# that spins while it waits for work takes a core from another that has work. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from safetensors.torch import save_file

from cai_bench.backends.dask.cluster import close_clusters
from cai_bench.commands import runner
from cai_bench.core import aws
from cai_bench.core.files import exclusive
from cai_bench.core.plan import make_plan
from cai_bench.data.partitions import open_dataset, synthesize
from cai_bench.inference.export import cached_export
from cai_bench.inference.runtime_choice import FORCE_RUNTIME_ENV
from cai_bench.inference.worker import FORCE_PROBE_ENV
from cai_bench.model.astromae import InceptionBlock, NormalCell, build_model
from cai_bench.store.jsonl import ResultsStore

# The upstream model's state-dict keys, shapes and dtypes, as the upstream checkpoint holds them
UPSTREAM_KEYS = Path(__file__).resolve().parent / "data" / "upstream-state-dict.tsv"
TINY_GB = 0.002  # 104 samples
TINY_MB = 0.52  # 4 partitions of 26 samples
PROBE_ANSWERS = ("fp32", "bf16")  # what the precision probe answers on a CPU without and with native bf16


class TinyAstroMAE(torch.nn.Module):
    """pcm-AstroMAE in miniature, from its own building blocks: a patch embedding and one NormalCell (attention,
    LayerNorm, GELU MLP, the PCM's grouped convolutions with BatchNorm), an Inception block with average
    pooling, the float64 magnitudes cast to the image's dtype, and the fusion layer."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(5, 16, kernel_size=8, stride=8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16) * 0.1)
        self.cell = NormalCell(16, num_heads=2, mlp_ratio=2)
        self.inception = torch.nn.Sequential(torch.nn.AvgPool2d(4), InceptionBlock(5, 4, 4, 4, 4))
        self.magnitude = torch.nn.Linear(5, 8)
        self.fuse = torch.nn.Linear(16 + 16 * 8 * 8 + 8, 1)

    def forward(self, image: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(image).flatten(2).transpose(1, 2)
        tokens = self.cell(torch.cat((self.cls.expand(image.shape[0], -1, -1), tokens), dim=1))
        pooled = self.inception(image).flatten(1)
        mags = torch.relu(self.magnitude(magnitude.to(image.dtype) / 20))
        return self.fuse(torch.cat((tokens[:, 0], pooled, mags), dim=1))


def pytest_generate_tests(metafunc):
    """A test that depends on what the precision probe answers (``@pytest.mark.probe``) runs once under each
    answer, forced through FORCE_PROBE_ENV (``forced_probe``), as on a CPU without native bf16 and on one with
    it: its outcome never depends on what this machine's probe would pick. Where FORCE_PROBE_ENV is already set,
    only under that answer (``make test`` sets fp32, ``make test-probes`` bf16). (The tests marked ``probe`` were
    found by running the suite with FORCE_PROBE_ENV set to a value that is not an answer: every test that asks
    the probe then fails.)"""
    if metafunc.definition.get_closest_marker("probe"):
        forced = os.environ.get(FORCE_PROBE_ENV)
        answers = [forced] if forced else list(PROBE_ANSWERS)
        metafunc.parametrize("forced_probe", answers, indirect=True, ids=[f"probe={a}" for a in answers])


@pytest.fixture(autouse=True)
def forced_probe(request, monkeypatch) -> str | None:
    """The probe's answer this test runs under (set in FORCE_PROBE_ENV for it and the processes it starts), or
    None where the test does not depend on the probe."""
    answer = getattr(request, "param", None)
    if answer is not None:
        monkeypatch.setenv(FORCE_PROBE_ENV, answer)
    return answer


@pytest.fixture(scope="session", autouse=True)
def _session_runtime():
    """The same answer for the session's own fixtures (a measured store, the emulator's runs), which run before
    any test's monkeypatch: without it each of them paid an export and a probe of every runtime (37 s of the
    measured store's 38 on 2 cores)."""
    patch = pytest.MonkeyPatch()
    patch.setenv(FORCE_RUNTIME_ENV, "torch")
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def forced_runtime(monkeypatch) -> str:
    """--runtime auto's answer in every test (and the processes it starts): torch, unless the test pins another
    (tests/test_runtime_auto.py pins both ways). What this machine's probe would pick never decides a test, and
    the suite does not pay a probe of every runtime in each run it makes."""
    monkeypatch.setenv(FORCE_RUNTIME_ENV, "torch")
    return "torch"


def pytest_collection_modifyitems(config, items):
    """The long tests (``@pytest.mark.long``, each saying why in its docstring) and those that use the model
    exports start first, so that under pytest-xdist (``make test``: ``-n auto``) no worker is left with a long
    test at the end while the others idle; without xdist the order changes, not what runs."""
    items.sort(
        key=lambda item: (
            0 if "exports" in getattr(item, "fixturenames", ()) else 1 if item.get_closest_marker("long") else 2
        )
    )


def _shared(tmp_path_factory, name: str) -> Path:
    """A directory every worker of this session sees (pytest-xdist's workers each have a base temp dir of
    their own, side by side)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """The cache of this test session (of this worker, under pytest-xdist): generated data sets and exports
    are made once and reused by every test that asks for the same ones. Set for session fixtures too."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.getbasetemp() / "cache"
    # Exports take half a minute each or more: the session's workers share them (the cache locks each one
    # while it is made, so a second worker waits for it, then reuses it)
    shared = _shared(tmp_path_factory, "exports")
    shared.mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "exports").exists():
        (path / "exports").symlink_to(shared, target_is_directory=True)
    # The Lambda image's interpreters (links into this venv) likewise: made by one worker, used by all
    images = _shared(tmp_path_factory, "image-python")
    images.mkdir(parents=True, exist_ok=True)
    if not (path / "image-python").exists():
        (path / "image-python").symlink_to(images, target_is_directory=True)
    patch.setenv("CAI_BENCH_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache, monkeypatch):
    """No test reads or writes the user's cache."""
    monkeypatch.setenv("CAI_BENCH_CACHE", str(session_cache))


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A full-size pcm-AstroMAE checkpoint in a file: seed 7's random weights with the last layer scaled up, so
    that the outputs spread over about 0.2 in redshift, like a trained model's, and agreement to 1e-5 is
    agreement, not two near-constants."""
    path = _shared(tmp_path_factory, "weights") / "seed7.safetensors"  # one path: the exports are keyed by it
    with exclusive(path.with_suffix(".lock")):
        if not path.exists():
            state = build_model(seed=7).state_dict()
            state["concat_block.2.weight"] = state["concat_block.2.weight"] * 20
            save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path.with_suffix(".partial")))
            path.with_suffix(".partial").rename(path)
    return path


@pytest.fixture(scope="session")
def exports(weights_file, session_cache) -> dict[str, Path]:
    """``weights_file`` exported for each runtime, once a session (its workers share them), into the session's
    cache, where a run with ``--weights weights_file --runtime onnxruntime|openvino`` finds it (an export of the
    full model takes half a minute or more on 2 cores: the tests share these two)."""
    made = {}
    for fmt in ("onnx", "openvino"):  # the IR is converted from the ONNX export (cached_export)
        export, seconds, cached = cached_export(str(weights_file), fmt)
        assert cached or seconds > 0
        made[fmt] = Path(export.directory)
    return made


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic data set; tests that change files copy it first (see ``data_copy``)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    synthesize(out, TINY_GB, TINY_MB, seed=3)
    return out


@pytest.fixture(scope="session")
def measured_store(tiny_data, tmp_path_factory) -> Path:
    """A store (its runs.jsonl) holding the record of one real run on ``tiny_data``, measured once a session:
    tests that check that a bad command leaves earlier results as they were start from a copy of it."""
    _, summary, refs = open_dataset(tiny_data)
    store = ResultsStore(tmp_path_factory.mktemp("measured"))
    runner.execute(make_plan("cpu", summary, refs, threads=1, precision="fp32"), store)
    return store.path


@pytest.fixture(scope="session")
def many_partitions(tmp_path_factory) -> Path:
    """20 partitions of 26 samples: enough work that a worker is busy when a test kills it."""
    out = tmp_path_factory.mktemp("many") / "data"
    synthesize(out, 0.01, 0.52, seed=5)
    return out


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``cai-bench ARGS`` in this process through the real entry point; returns (exit code, stdout, stderr)."""
    from cai_bench import cli as cli_module

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["cai-bench", *map(str, args)])
        code = 0
        try:
            cli_module.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def upstream_spec() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every entry of the upstream state dict (``tests/data/upstream-state-dict.tsv``)."""
    rows = []
    for line in UPSTREAM_KEYS.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        dims = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
        rows.append((key, dims, dtype))
    return rows


def hand_record(
    backend: str,
    wall_s: float,
    *,
    host: str = "alpha",
    cpu: str = "Xeon A",
    gpus: tuple[str, ...] = (),
    gb: float = 1.0,
    partition_mb: float = 25.0,
    batch_size: int = 512,
    precision: str = "fp32",
    threads: int | None = 2,
    phases: list[tuple[float, float, float, float]] | None = None,
    status: str = "ok",
    created: str = "2026-11-27T00:00:00Z",
    peak_rss: int = 2**30,
    cost_usd: float | None = None,
) -> dict:
    """A run record as the store holds it, built from the real dataclasses with chosen figures.

    ``phases`` is (startup_s, wait_s, load_s, compute_s) per partition, all on one worker.
    """
    from dataclasses import asdict

    from cai_bench.core.plan import (
        BITS_PER_SAMPLE,
        DataSummary,
        PartitionRef,
        data_gb,
        make_plan,
        partition_sizes,
        samples_for_gb,
    )
    from cai_bench.core.records import RunRecord, WorkerRecord, new_run_id, summarize_run

    samples = samples_for_gb(gb)
    sizes = partition_sizes(samples, partition_mb)
    each = wall_s / len(sizes)
    default = (0.1, 0.0, 0.2, each - 0.3) if each > 0.4 else (0.1 * each, 0.0, 0.2 * each, 0.7 * each)
    phases = phases or [default] * len(sizes)
    refs = tuple(PartitionRef(f"/d/part-{i}", i, n, n * 20524, "0" * 64) for i, n in enumerate(sizes))
    source = {"kind": "synthetic", "seed": 0, "generator_version": 1, "gb": gb}
    summary = DataSummary("/d", "abc", source, samples, data_gb(samples), partition_mb, len(sizes))
    plan = make_plan(backend, summary, refs, batch_size=batch_size, precision=precision, threads=threads, repeats=3)
    workers = []
    for (startup, wait, load, compute), ref in zip(phases, refs, strict=True):
        workers.append(
            WorkerRecord(
                "w0", ref.index, ref.path, ref.samples, ref.samples * BITS_PER_SAMPLE, 1, batch_size, precision,
                "cpu", startup, wait, load, compute, startup + wait + load + compute, ref.samples / compute,
                ref.samples * BITS_PER_SAMPLE / compute, 0.1, 0.1, 0.1, peak_rss, host, 1,
            )
        )  # fmt: skip
    run_summary = summarize_run(workers, wall_s)
    run_summary.cost_usd = cost_usd
    environment = {"host": host, "cpu_model": cpu, "gpus": list(gpus), "cpu_physical_cores": 2}
    record = RunRecord(
        run_id=new_run_id(), created_utc=created, status=status, backend=backend, repeat=1, repeats=3,
        plan=plan.to_record(), weights={"weights": "random-init", "seed": 0}, environment=environment,
        summary=run_summary, workers=workers, backend_info={"threads": threads},
    )  # fmt: skip
    return asdict(record)


def write_store(directory: Path, records: list[dict]) -> Path:
    import json

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------- S3 on loopback


@pytest.fixture(scope="session")
def local_s3():
    """moto's S3 server, in a process of its own on a loopback port: the real S3 HTTP API, for the session."""
    from cai_bench.backends.aws_lambda.local_s3 import start_local_s3

    server = start_local_s3()
    yield server.url
    server.stop()


@pytest.fixture
def s3(local_s3, monkeypatch, request):
    """This process pointed at the loopback S3, with throwaway credentials, and a fresh bucket: its name."""
    import re

    from cai_bench.core import aws

    monkeypatch.setenv(aws.S3_ENDPOINT_ENV, local_s3)
    monkeypatch.setenv(aws.EMULATED_ENV, "1")
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{id(request) % 10**6}"
    aws.s3_client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """A machine with no AWS configuration at all."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", aws.EMULATED_ENV,
                 aws.S3_ENDPOINT_ENV, "AWS_REGION", "AWS_DEFAULT_REGION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find either
    aws.client.cache_clear()
    yield
    aws.client.cache_clear()


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: a shell's background job (a CI script run with
    ``&``) starts with SIGINT ignored, and a Python started so never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---------------------------------------------------------------------------------- the comm layer's services


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(*options: str):
    """A real redis-server on a free loopback port (``options``: more of its own, ``--requirepass PW`` say), once
    it answers: (its process, its port). The caller stops it."""
    import socket
    import subprocess
    import time

    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *options], stdout=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def _bring_redis() -> str | None:
    """Debian's redis-server, installed where it is missing, as scripts/slurm-local.sh brings SLURM (as root, once
    for the session's workers); None once it is there, else why not, in one line."""
    import shutil
    import subprocess
    import tempfile

    with exclusive(Path(tempfile.gettempdir()) / "cai-bench-redis-install.lock"):
        if shutil.which("redis-server"):
            return None
        if os.geteuid() != 0:
            return "redis-server is not installed and installing it needs root: apt-get install -y redis-server"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "redis-server"]
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:  # a fresh machine's package lists may be missing or stale
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if shutil.which("redis-server") is None:
            return f"apt-get install -y redis-server failed: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on a loopback port for the session: Debian's, installed here where it is missing (so
    the tests that need it never skip); where it cannot be, they fail with one line saying how to install it."""
    why = _bring_redis()
    if why is not None:
        pytest.fail(why)
    proc, port = start_redis()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def in_threads(urls: list[str], world_size: int, program, timeout_s: float = 10.0, **connect) -> list:
    """``program(communicator)`` on every rank, each a thread with its own communicator; their answers, or the
    first error raised."""
    import threading
    import uuid

    from cai_bench import comm

    run_id, key = uuid.uuid4().hex[:12], comm.new_key()
    answers, errors = [None] * world_size, []

    def rank(r: int) -> None:
        try:
            with comm.connect(urls, r, world_size, run_id, key, timeout_s, **connect) as communicator:
                answers[r] = program(communicator)
        except Exception as exc:
            errors.append((r, exc))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0][1]
    return answers


@pytest.fixture(scope="session")
def rendezvous_url():
    """``cai-bench comm rendezvous`` in a process of its own on a free loopback port."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "cai_bench", "comm", "rendezvous", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    line = proc.stdout.readline()
    assert line.startswith("rendezvous listening on "), line
    yield "direct://" + line.split()[-1]
    proc.terminate()
    proc.wait(timeout=10)


def check_timeline(record: dict, lanes: int | None = None, units_overlap: bool = False):
    """The timeline of a stored run record, checked against the record, and its figure drawn: one compute bar
    per unit the record holds, each worker's units in the order they ended and never overlapping (but where a
    worker's batches span units: a GPU's stream), no more workers busy at once than there are lanes, and one drawn
    bar per piece. Returns the timeline for the caller's own checks (the backend's lanes, its failures)."""
    from cai_bench.measure.timeline import timeline_of
    from cai_bench.render.figures.timelines import timeline_figure

    line = timeline_of(record)
    drawn_units = [s.unit for lane in line.lanes for s in lane.segments if s.unit is not None]
    assert sorted(set(drawn_units)) == list(range(len(record["workers"])))  # every unit, each on one lane
    for lane in line.lanes:
        spans: dict[int, list[float]] = {}
        for s in (s for s in lane.segments if s.unit is not None and s.kind != "load"):
            span = spans.setdefault(s.unit, [s.start_s, s.end_s])
            span[0], span[1] = min(span[0], s.start_s), max(span[1], s.end_s)
        ordered = sorted(spans.values(), key=lambda span: span[1])
        ended = [record["workers"][u]["ended_epoch_s"] for u in sorted(spans, key=lambda u: spans[u][1])]
        assert ended == sorted(ended)  # the lane's units in the order the record says they ended
        assert units_overlap or all(a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(ordered)), lane.name
    assert max(n for _, n in line.running()) <= len(line.lanes)
    assert all(s.start_s >= -0.05 and s.end_s <= line.wall_s * 1.05 + 0.5 for lane in line.lanes
               for s in lane.segments if s.kind != "load")  # fmt: skip
    if lanes is not None:
        assert len(line.lanes) == lanes
    figure = timeline_figure(line)
    drawn = [c for c in figure.axes[0].collections if len(c.get_paths())]
    assert len(drawn) == sum(len(lane.segments) for lane in line.lanes)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [lane.label[:28] for lane in line.lanes]
    return line


# ---------------------------------------------------------------------------------- a real SLURM cluster

ROOT = Path(__file__).resolve().parent.parent
SLURM_DIR = Path(os.environ.get("CAI_BENCH_SLURM_DIR") or "/tmp/cai-bench-slurm")
# Set by .ci/run: there the cluster must start, and a test that would skip for want of it fails instead
REQUIRE_SLURM_ENV = "CAI_BENCH_REQUIRE_SLURM"


def _slurm_answers(conf: Path) -> bool:
    import subprocess

    if not conf.is_file():
        return False
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and any(s in done.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node SLURM cluster of scripts/slurm-local.sh (munged, MariaDB, slurmdbd, slurmctld, slurmd on
    loopback): the one already up (.ci/run starts it), else started here, once for the session's workers, and
    stopped when the session ends (pytest_sessionfinish). Its slurm.conf path; SLURM_CONF is set to it."""
    import subprocess

    conf = SLURM_DIR / "etc" / "slurm.conf"
    why = None
    with exclusive(SLURM_DIR.parent / f"{SLURM_DIR.name}.lock"):
        if not _slurm_answers(conf):
            if os.geteuid() != 0:
                why = "the local SLURM cluster runs its daemons as root (scripts/slurm-local.sh up)"
            else:
                env = {**os.environ, "CAI_BENCH_SLURM_DIR": str(SLURM_DIR)}
                done = subprocess.run([str(ROOT / "scripts" / "slurm-local.sh"), "up"], env=env, capture_output=True,
                                      text=True, timeout=900)  # fmt: skip
                if done.returncode != 0 or not _slurm_answers(conf):
                    why = f"scripts/slurm-local.sh up failed: {done.stderr.strip()[-500:]}"
                else:
                    (SLURM_DIR / "started-by-tests").touch()
    if why is not None:
        if os.environ.get(REQUIRE_SLURM_ENV):
            pytest.fail(f"{REQUIRE_SLURM_ENV} is set, but {why}")
        pytest.skip(why)
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(conf))
    yield conf
    patch.undo()


def pytest_sessionfinish(session, exitstatus):
    """The cluster the tests started themselves is stopped once, by the session's controller (not each worker)."""
    import subprocess

    if hasattr(session.config, "workerinput") or not (SLURM_DIR / "started-by-tests").exists():
        return
    env = {**os.environ, "CAI_BENCH_SLURM_DIR": str(SLURM_DIR)}
    subprocess.run([str(ROOT / "scripts" / "slurm-local.sh"), "down"], env=env, capture_output=True, timeout=120)


def killing_the_other_worker():
    """An ``emit`` for a backend's run of two workers that, once both have finished a partition (both are pulling
    work), kills for real (SIGKILL) the one that did not just report, which is in the middle of its next partition;
    with the list of what was emitted and the pid it killed."""
    seen_pids: list[int] = []
    killed: list[int] = []
    emitted: list = []

    def emit(result):
        emitted.append(result)
        pid = result.record.pid
        if pid not in seen_pids:
            seen_pids.append(pid)
        if not killed and len(seen_pids) == 2:
            victim = next(p for p in seen_pids if p != pid)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    return emit, emitted, killed


@contextlib.contextmanager
def dask_apart(folder: Path, workers: int = 2):
    """``dask scheduler`` and ``workers`` ``dask worker`` processes (no nanny: a killed one stays dead), started
    apart on loopback as a user starts them, stopped at the end. Yields the scheduler's address and the processes
    (the scheduler first)."""
    scheduler_file = folder / "scheduler.json"
    dask = str(Path(sys.executable).with_name("dask"))  # Dask's own command line, as installed beside this Python
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    started = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                 "--scheduler-file", str(scheduler_file)], **quiet)]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for n in range(workers):
            started.append(subprocess.Popen(
                [dask, "worker", address, "--host", "127.0.0.1", "--no-nanny", "--nthreads", "2", "--name",
                 f"apart-{n}", "--no-dashboard"],
                **quiet,
            ))  # fmt: skip
        yield address, started
    finally:
        close_clusters()  # the clients the tests' runs left open to it, before it stops
        for process in reversed(started):
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def external_cluster(tmp_path_factory):
    """A scheduler and two workers started apart (``dask_apart``), for the session: its address and the workers'
    pids."""
    with dask_apart(tmp_path_factory.mktemp("dask")) as (address, started):
        yield {"address": address, "worker_pids": {p.pid for p in started[1:]}}
