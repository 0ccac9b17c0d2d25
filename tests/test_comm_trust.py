"""Nothing forged: an attacker on the same real Redis, the same moto S3 endpoint or the same network as a run
pushes forged, replayed and junk frames into its channels, connects to its ranks' ports without the secret, replays
what it saw and sends absurd lengths; the run's measurements stay its own and the record names what was dropped.
Channel failures (a killed Redis, a stolen frame) are one line naming the channel and the peer."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import replace

import numpy as np
import psutil
import pytest
from conftest import in_threads, start_redis

from cai_bench import comm
from cai_bench.backends.aws_lambda import driver
from cai_bench.backends.aws_lambda.driver import run_lambda
from cai_bench.backends.aws_lambda.wire import result_key
from cai_bench.comm import frames
from cai_bench.comm.direct import DirectChannel
from cai_bench.comm.redis_channel import RedisChannel
from cai_bench.comm.seal import Sealer
from cai_bench.core.plan import make_plan
from cai_bench.core.records import decode_result
from cai_bench.data.partitions import open_dataset
from cai_bench.data.s3 import S3Prefix

redis = pytest.importorskip("redis")


def _forged_frame(src: int) -> bytes:
    """What a forger would like rank 0 to read from ``src``: a million labelled samples, in the unsealed format."""
    return frames.encode("allreduce", 2, src, [np.full(8, 1e6)])


def _push_into(client, space: str, world: int, stranger: str, pushed: Counter) -> None:
    """Into every pair's list of a run: junk, an unsealed forged frame, and a frame sealed with another key."""
    for src in range(world):
        for dst in range(world):
            if src != dst:
                sealed_elsewhere = Sealer(stranger, space, src).seal("redis", dst, _forged_frame(src))
                client.rpush(f"{space}:m:{src}:{dst}", b"junk" * 16, _forged_frame(src), sealed_elsewhere)
                pushed.update(["junk", "forged", "other key"])


def _redis_attacker(url: str, stop: threading.Event, pushed: Counter) -> None:
    """Another client of the same server: it finds every run's keys by scanning, pushes into every pair's list
    junk, unsealed forged frames and frames sealed with another key, and pushes again any frame it sees there."""
    client = redis.Redis.from_url(url)
    stranger = comm.new_key()
    while not stop.is_set():
        spaces: dict[str, set[int]] = {}
        for key in client.scan_iter(match="cai-bench:*:alive:*"):
            space, rank = key.decode().rsplit(":alive:", 1)
            spaces.setdefault(space, set()).add(int(rank))
        for space, ranks in spaces.items():
            for key in client.scan_iter(match=f"{space}:m:*"):
                for frame in client.lrange(key, 0, -1):  # whatever waits there now, pushed again later
                    client.rpush(key, frame)
                    pushed["replayed"] += 1
            _push_into(client, space, max(ranks) + 1, stranger, pushed)
        time.sleep(0.01)
    client.close()


def _s3_attacker(bucket: str, stop: threading.Event, pushed: Counter) -> None:
    """Another client of the same bucket: it lists the run's objects and writes junk and copies of what it finds
    under every name it can work out (the next numbers of each pair, and the names of a run without tags)."""
    from cai_bench.core import aws

    client = aws.s3_client()
    while not stop.is_set():
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="comm/").get("Contents", [])]
        for key in keys:
            if "/m/" not in key:
                continue
            head, name = key.rsplit("/", 1)
            number = int(name.split("-")[0])
            try:
                captured = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:
                continue  # read and deleted by its rank meanwhile
            for later in (number + 1, number + 2):
                client.put_object(Bucket=bucket, Key=f"{head}/{later:09d}", Body=captured)
                client.put_object(Bucket=bucket, Key=f"{head}/{later:09d}-{'0' * 20}", Body=b"junk" * 16)
                pushed["replayed"] += 1
                pushed["junk"] += 1
        time.sleep(0.01)


def _plan(data, backend: str, **options):
    _, summary, refs = open_dataset(data)
    return make_plan(backend, summary, refs, precision="fp32", batch_size=16, threads=2, backend_options=options)


def _run_under_attack(plan, hold_s: float, stop: threading.Event, attack, *args) -> tuple:
    """A no-model emulated Lambda run while ``attack(*args)`` runs in a thread (until ``stop``): (its BackendRun,
    the results it emitted)."""
    attacker = threading.Thread(target=attack, args=args)
    attacker.start()
    emitted = []
    try:
        return run_lambda(plan, emitted.append, mode="no-model", hold_s=hold_s), emitted
    finally:
        stop.set()
        attacker.join(30)


def _own_results_stand(run, emitted: list) -> None:
    """Every unit the run emitted is what its invocation wrote to S3 itself, before any collective."""
    results = S3Prefix.parse(run.info["results"])
    assert len(emitted) == 4
    for result in emitted:
        position = result.record.partition  # one unit per partition here: its position is its partition
        own = decode_result(results.read(result_key(position)))
        assert result.record.worker_id == own.record.worker_id
        assert (result.record.compute_s, result.record.load_s, result.record.samples) == (
            own.record.compute_s, own.record.load_s, own.record.samples)  # fmt: skip
        np.testing.assert_array_equal(result.object_id, own.object_id)
        np.testing.assert_array_equal(result.redshift, own.redshift)


@pytest.mark.parametrize("channel", ["redis", "s3"])
def test_a_live_lambda_run_under_attack_on_its_channel_keeps_its_own_measurements(
    channel, s3, tiny_data, local_s3, redis_url, monkeypatch
):
    url = redis_url if channel == "redis" else f"s3://{s3}/comm"
    plan = _plan(tiny_data, "lambda", emulate=True, endpoint_url=local_s3, bucket=f"s3://{s3}", max_concurrency=4,
                 memory_mb=512, comm=url, comm_timeout_s=30.0)  # fmt: skip
    stop, pushed = threading.Event(), Counter()
    if channel == "redis":
        # Scanning finds a run's lists only once its ranks have connected, a race with their first reads: the
        # attacker is also told the run's names as soon as the driver makes them (from the secret, which it never
        # uses to seal), so that junk waits in every list before any rank reads, whatever the machine's speed
        made = driver.config_for_run

        def seeded(options, world_size, work_dir):
            config = made(options, world_size, work_dir)
            client = redis.Redis.from_url(redis_url)
            _push_into(client, f"cai-bench:{comm.space(config.key, config.run_id)}", world_size, comm.new_key(), pushed)
            client.close()
            return config

        monkeypatch.setattr(driver, "config_for_run", seeded)
    attack = _redis_attacker if channel == "redis" else _s3_attacker
    run, emitted = _run_under_attack(plan, 0.5, stop, attack, redis_url if channel == "redis" else s3, stop, pushed)
    assert pushed["junk"] > 0 and pushed["replayed"] > 0, pushed  # the attacker did reach the run's channel
    comm_record = run.info["comm"]
    assert comm_record["collectives"] == "ok" and comm_record["aggregate_reads"] == 1, comm_record
    assert comm_record["unit_reads"] == 0  # the units came from the aggregate the collectives built
    _own_results_stand(run, emitted)
    # No model ran, so no prediction is finite and the run has no accuracy, as it would without the attacker: a
    # forger's sums (a million labelled samples) would have made one
    assert comm_record["accuracy"] is None
    assert comm_record["compute_s_sum"] == pytest.approx(sum(r.record.compute_s for r in emitted))
    if channel == "redis":  # every frame pushed into a list is read by its rank: each was dropped, and named
        reasons = Counter()
        for rank in comm_record["ranks"]:
            for entry in rank.get("rejected") or []:
                assert entry["channel"] == "redis"
                reasons.update(entry["reasons"])
        assert {"not a sealed frame", "bad tag (not this run's key)"} <= set(reasons), reasons
        assert comm_record["dropped_frames"] == sum(reasons.values()) > 0


def test_a_frame_seen_on_the_wire_and_pushed_again_is_dropped_as_replayed(redis_url, monkeypatch):
    """A tap on the ranks' sends stands for an attacker watching the server (MONITOR): each frame it saw is
    pushed again after the ranks took the first, and every copy is dropped as a replay."""
    seen: list[tuple[str, bytes]] = []
    real_send = RedisChannel.send

    def tapped(self, dst, frame, deadline):
        seen.append((self._key("m", self.rank, dst), frame))
        real_send(self, dst, frame, deadline)

    monkeypatch.setattr(RedisChannel, "send", tapped)
    client = redis.Redis.from_url(redis_url)

    def program(c):
        first = c.allreduce(c.rank + 1)
        c.barrier()
        if c.rank == 0:  # every frame of the first two calls, pushed again by the watcher
            for key, frame in list(seen):
                client.rpush(key, frame)
        c.barrier()
        return first, c.allreduce(np.arange(3) * (c.rank + 1)), c.info()["rejected"]

    answers = in_threads([redis_url], 3, program)
    assert [a[0] for a in answers] == [6, 6, 6]
    for _, total, _ in answers:
        np.testing.assert_array_equal(total, np.arange(3) * 6)
    dropped = Counter()
    for *_, rejected in answers:
        for entry in rejected:
            dropped.update(entry["reasons"])
    assert dropped["replayed"] > 0 and set(dropped) == {"replayed"}, dropped


def test_a_stolen_frame_replaced_by_junk_fails_the_wait_in_one_line_naming_channel_and_peer(redis_url):
    run_id, key = uuid.uuid4().hex[:12], comm.new_key()
    client = redis.Redis.from_url(redis_url)
    sent, errors = threading.Event(), []

    def sender():
        with comm.connect([redis_url], 1, 2, run_id, key, 2.0) as c:
            c.send(5, 0)
            sent.set()
            time.sleep(3)

    def receiver():
        with comm.connect([redis_url], 0, 2, run_id, key, 2.0) as c:
            sent.wait(10)
            (stolen_key,) = client.keys(f"cai-bench:{comm.space(key, run_id)}:m:1:0")
            assert client.lpop(stolen_key)  # the attacker takes the real frame and leaves junk
            client.rpush(stolen_key, b"not a frame")
            try:
                c.recv(1)
            except comm.CommError as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    (error,) = errors
    assert "\n" not in error and "rank 0" in error and "rank 1" in error and "over redis" in error, error
    assert "dropped 1 frame(s) that failed the seal" in error


def test_a_killed_redis_is_one_commerror_line_naming_the_channel(redis_url):
    server, port = start_redis()  # a server of this test's own (redis_url: the fixture checks it can be had)
    url = f"redis://127.0.0.1:{port}/0"
    connected, errors = threading.Barrier(3), []

    def rank(r, run_id, key):
        try:
            with comm.connect([url], r, 2, run_id, key, 3.0) as c:
                connected.wait(10)
                connected.wait(10)  # the server is killed between these
                c.allreduce(1.0)
        except comm.CommError as exc:
            errors.append(str(exc))

    run_id, key = uuid.uuid4().hex[:12], comm.new_key()
    threads = [threading.Thread(target=rank, args=(r, run_id, key)) for r in range(2)]
    [t.start() for t in threads]
    connected.wait(10)
    server.kill()
    server.wait()
    connected.wait(10)
    [t.join(60) for t in threads]
    assert len(errors) == 2, errors
    for error in errors:
        assert "\n" not in error and error.startswith(url) and "ConnectionError" in error, error


# ------------------------------------------------------------------------------------------ the direct channel


def _length_bomb(address) -> int:
    """A 4 GiB length, then as much as the rank takes: the bytes this client got in before it was cut off."""
    sent = 0
    with socket.create_connection(address, timeout=5) as sock:
        try:
            sock.sendall((0xFFFFFFFF).to_bytes(4, "big"))
            chunk = b"\0" * (1 << 20)
            for _ in range(400):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    return sent


def _hello_of(address) -> bytes:
    """Connects to a rank's port and captures the hello it sends first (its run, rank and nonce)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.settimeout(5)
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data[: 4 + int.from_bytes(data[:4], "big")]


def _offer(address, frames_to_send: list[bytes]) -> None:
    """Sends ``frames_to_send`` to a rank's port and reads whatever comes back until the rank closes."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.settimeout(5)
        try:
            for frame in frames_to_send:
                sock.sendall(frame)
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass


def test_a_ranks_port_takes_nothing_from_a_client_without_the_secret(rendezvous_url, monkeypatch):
    """While ranks 0 and 1 wait for a late rank 2: a client that claims a rank with a made-up hello, one that
    replays rank 0's own hello (captured from its port) to rank 1 with a tag, and one that sends a 4 GiB length.
    Each is refused, memory stays bounded, every listening socket of the run is on loopback, and the run's
    collectives give the right answer over direct connections only."""
    listening, attacks, refused = {}, {}, Counter()
    in_window = threading.Barrier(3)
    real_connect_all, real_prove = DirectChannel._connect_all, DirectChannel._prove

    def observed(self, within_s):
        listening[self.rank] = (self.bound, self._port)
        if self.rank == 2:
            time.sleep(2.5)  # the window the attacks run in: ranks 0 and 1 listen for their last peer
        else:
            in_window.wait(20)
        return real_connect_all(self, within_s)

    def counted(self, sock, deadline):
        peer = real_prove(self, sock, deadline)
        if peer is None:
            refused[self.rank] += 1
        return peer

    monkeypatch.setattr(DirectChannel, "_connect_all", observed)
    monkeypatch.setattr(DirectChannel, "_prove", counted)

    def attack():
        in_window.wait(20)
        time.sleep(0.3)
        ports = {port for _, port in listening.values()}
        sockets = [c for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        attacks["listening"] = [c.laddr.ip for c in sockets if c.laddr.port in ports]
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        made_up = json.dumps({"run": "guessed", "rank": 2, "nonce": "00" * 16}).encode()
        _offer(listening[1], [len(made_up).to_bytes(4, "big") + made_up])
        captured = _hello_of(listening[0])
        attacks["captured_run"] = json.loads(captured[4:])["run"]
        _offer(listening[1], [captured, (32).to_bytes(4, "big") + b"\1" * 32])
        attacks["bomb_sent"] = _length_bomb(listening[0])
        attacks["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before

    attacker = threading.Thread(target=attack)
    attacker.start()
    answers = in_threads([rendezvous_url], 3, lambda c: (c.allreduce(np.arange(4) + c.rank), c.info()["channels"][0]),
                     connect_timeout_s=15)  # fmt: skip
    attacker.join(60)
    for total, info in answers:
        np.testing.assert_array_equal(total, np.arange(4) * 3 + 3)
        assert info["bound"] == "127.0.0.1" and info["fallback_pairs"] == []  # every pair its own connection
    assert attacks["listening"] and set(attacks["listening"]) == {"127.0.0.1"}, attacks
    assert refused[1] >= 2 and refused[0] >= 2, refused  # the made-up and replayed hellos, the capture, the bomb
    assert attacks["bomb_sent"] < 64 << 20, attacks  # cut off long before its 4 GiB
    assert attacks["rss_growth_kb"] < 64 * 1024, attacks


def _prove_from(addresses: dict) -> int | None:
    """Rank 0 of a run of two proving a connection from a client that holds every answer a real rank 1 would give
    (a relay would have them from rank 1 itself): the rank it takes the client for, given where the server saw
    rank 1 (``addresses``; None: where the client really connects from)."""
    from cai_bench.comm import direct

    key = b"k" * 32
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    channel = DirectChannel.__new__(DirectChannel)
    channel.run_id, channel.rank, channel.world_size, channel._handshake_key = "r", 0, 2, key
    channel.addresses = addresses or {0: server.getsockname(), 1: client.getsockname()}

    def client_side():
        nonce = bytes(range(16))
        hello = json.dumps({"run": "r", "rank": 1, "nonce": nonce.hex()}).encode()
        client.sendall(len(hello).to_bytes(4, "big") + hello)
        head = client.recv(4, socket.MSG_WAITALL)
        theirs = json.loads(client.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL))
        client.sendall((32).to_bytes(4, "big") + direct.response(key, 1, 0, nonce, bytes.fromhex(theirs["nonce"])))

    helper = threading.Thread(target=client_side, daemon=True)
    helper.start()
    try:
        return channel._prove(accepted, time.monotonic() + 5)
    finally:
        helper.join(5)
        for sock in (client, accepted, server):
            sock.close()


def test_a_relay_between_two_ranks_is_refused_for_its_address_though_its_tag_is_right():
    assert _prove_from({}) == 1  # the right tag from where rank 1 was seen: rank 1
    assert _prove_from({0: ("127.0.0.1", 1), 1: ("127.0.0.1", 2)}) is None  # the same tag from elsewhere: refused


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6 on loopback")
def test_an_ipv6_rendezvous_address_is_parsed_and_used(tmp_path):
    import sys

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    proc = subprocess.Popen([sys.executable, "-m", "cai_bench", "comm", "rendezvous", "--host", "::1", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[-1])
        url = f"direct://[::1]:{port}"
        assert comm.check_urls([url]) == ["direct"]
        answers = in_threads([url], 3, lambda c: (c.allreduce(c.rank + 1), c.info()["channels"][0]["bound"]))
        assert answers == [(6, "::1")] * 3
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------------- a Lambda run's S3 objects


def test_a_result_object_replaced_in_the_bucket_is_refused_and_its_unit_run_again(s3, tiny_data, local_s3):
    """Another client of the bucket replaces each unit's result as soon as it lands, once, with a forged one (the
    real object's metadata copied over): the driver reads none of them, the units are run again, and every
    result the run keeps is one its own invocations wrote."""
    from cai_bench.core import aws
    from cai_bench.core.records import PartitionResult, encode_result

    plan = _plan(tiny_data, "lambda", emulate=True, endpoint_url=local_s3, bucket=f"s3://{s3}", max_concurrency=2,
                 partitions_per_invocation=2, memory_mb=512, retries=3)  # fmt: skip
    stop, replaced = threading.Event(), []

    def forger():
        client, seen = aws.s3_client(), set()
        while not stop.is_set():
            for entry in client.list_objects_v2(Bucket=s3).get("Contents", []):
                key = entry["Key"]
                if "/unit-" not in key or key in seen:
                    continue
                seen.add(key)
                real = client.get_object(Bucket=s3, Key=key)
                honest = decode_result(real["Body"].read())
                forged = replace(honest.record, worker_id="forger", compute_s=123.0)
                body = encode_result(PartitionResult(forged, honest.object_id, honest.prediction, honest.redshift))
                client.put_object(Bucket=s3, Key=key, Body=body, Metadata=real.get("Metadata") or {})
                replaced.append(key)
            time.sleep(0.005)

    run, emitted = _run_under_attack(plan, 0.6, stop, forger)
    assert replaced, "the forger replaced nothing"
    assert sorted(r.record.partition for r in emitted) == [0, 1, 2, 3]
    assert not [r for r in emitted if r.record.worker_id == "forger" or r.record.compute_s == 123.0]
    errors = [e for unit in run.info["retried"] for e in unit["errors"]]
    assert errors and all("failed its seal: not written by this run's functions" in e for e in errors), errors
