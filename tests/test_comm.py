"""The comm layer on its real services: every operation on each channel (direct TCP through the rendezvous
server, a real redis-server, S3 on moto's server) for several world sizes, checked against numpy; ranks that
disagree; a killed rank; the rendezvous server's isolation of runs; a direct pair that cannot connect and falls
back; the channel policy."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import in_threads

from cai_bench import comm
from cai_bench.comm.direct import rendezvous
from cai_bench.comm.policy import choose_channel, default_models, estimate

CHANNELS = ("direct", "redis", "s3")


@pytest.fixture(params=CHANNELS)
def channel_url(request) -> str:
    if request.param == "direct":
        return request.getfixturevalue("rendezvous_url")
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return f"s3://{request.getfixturevalue('s3')}/comm"


def _inputs(rank: int) -> dict:
    rng = np.random.default_rng(rank)
    return {
        "array": rng.standard_normal((3, 4)).astype(np.float32),
        "ints": rng.integers(-50, 50, size=7).astype(np.int64),
        "matrix": np.array([[1, rank], [0, rank + 2]], dtype=np.int64),  # products of these do not commute
        "ragged": np.arange(rank + 1, dtype=np.int16),
    }


MATMUL = comm.user_op(lambda a, b: a @ b, associative=True, commutative=False, name="matmul")
MINUS = comm.user_op(lambda a, b: a - b, associative=False, commutative=False, name="minus")


def _every_operation(c: comm.Communicator) -> dict:
    size, rank, x = c.world_size, c.rank, _inputs(c.rank)
    out = {}
    c.barrier()
    out["bcast"] = c.bcast(x["array"] if rank == size - 1 else None, root=size - 1)
    out["reduce"] = c.reduce(x["ints"], "sum", root=size // 2)
    out["allreduce_sum"] = c.allreduce(rank + 1)
    out["allreduce_max"] = c.allreduce(x["array"], "max")
    out["allreduce_min_list"] = c.allreduce([rank, -rank], "min")
    out["allreduce_prod"] = c.allreduce(float(rank + 1), "prod")
    out["allreduce_matmul"] = c.allreduce(x["matrix"], MATMUL)
    out["reduce_minus"] = c.reduce(float(rank + 1), MINUS, root=size - 1)
    out["scan"] = c.scan(x["ints"])
    out["scan_matmul"] = c.scan(x["matrix"], MATMUL)
    out["scan_minus"] = c.scan(float(rank + 1), MINUS)
    out["gather"] = c.gather(x["ragged"], root=1 % size)
    out["scatter"] = c.scatter([np.full((2, 2), r, np.uint8) for r in range(size)] if rank == 0 else None, root=0)
    c.send({"rank": rank}.get("rank") * 10, (rank + 1) % size)
    out["ring"] = c.recv((rank - 1) % size)
    c.barrier()
    return out


def _left_fold(fn, values):
    acc = values[0]
    for value in values[1:]:
        acc = fn(acc, value)
    return acc


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_every_operation_gives_what_numpy_gives_on_the_same_inputs(channel_url, world_size):
    answers = in_threads([channel_url], world_size, _every_operation)
    inputs = [_inputs(r) for r in range(world_size)]
    matrices = [x["matrix"] for x in inputs]
    prefix_products = [_left_fold(np.matmul, matrices[: r + 1]) for r in range(world_size)]
    for rank, got in enumerate(answers):
        np.testing.assert_array_equal(got["bcast"], inputs[-1]["array"])
        assert got["allreduce_sum"] == world_size * (world_size + 1) // 2
        np.testing.assert_array_equal(got["allreduce_max"], np.max([x["array"] for x in inputs], axis=0))
        assert got["allreduce_min_list"] == [0, -(world_size - 1)]
        assert got["allreduce_prod"] == float(np.prod(np.arange(1, world_size + 1)))
        np.testing.assert_array_equal(got["allreduce_matmul"], prefix_products[-1])
        np.testing.assert_array_equal(got["scan"], np.sum([x["ints"] for x in inputs[: rank + 1]], axis=0))
        np.testing.assert_array_equal(got["scan_matmul"], prefix_products[rank])
        assert got["scan_minus"] == _left_fold(lambda a, b: a - b, [float(r + 1) for r in range(rank + 1)])
        np.testing.assert_array_equal(got["scatter"], np.full((2, 2), rank, np.uint8))
        assert got["scatter"].dtype == np.uint8
        assert got["ring"] == ((rank - 1) % world_size) * 10
        if rank == world_size // 2:
            np.testing.assert_array_equal(got["reduce"], np.sum([x["ints"] for x in inputs], axis=0))
        else:
            assert got["reduce"] is None
        if rank == world_size - 1:  # 1 - 2 - 3 - ...: left to right, not any other way
            assert got["reduce_minus"] == _left_fold(lambda a, b: a - b, [float(r + 1) for r in range(world_size)])
        gathered = got["gather"]
        if rank == 1 % world_size:
            assert [g.tolist() for g in gathered] == [list(range(r + 1)) for r in range(world_size)]
            assert all(g.dtype == np.int16 for g in gathered)
        else:
            assert gathered is None


def test_a_non_commutative_product_comes_out_in_rank_order_not_any_order(redis_url, rendezvous_url):
    """The order matters for these matrices: the reversed product differs, so a tree that swapped sides fails."""
    matrices = [_inputs(r)["matrix"] for r in range(5)]
    assert not np.array_equal(_left_fold(np.matmul, matrices), _left_fold(np.matmul, matrices[::-1]))
    for url in (rendezvous_url, redis_url):
        answers = in_threads([url], 5, lambda c: c.reduce(_inputs(c.rank)["matrix"], MATMUL, root=3))
        np.testing.assert_array_equal(answers[3], _left_fold(np.matmul, matrices))


def test_ranks_that_call_different_operations_fail_naming_both(rendezvous_url):
    def program(c):
        return c.bcast(1.0, root=0) if c.rank == 0 else c.allreduce(1.0)

    with pytest.raises(comm.CommError, match=r"rank 1 waits for allreduce #1 from rank 0, but rank 0 sent bcast #1"):
        in_threads([rendezvous_url], 2, program, timeout_s=3)


def test_values_that_cannot_be_reduced_together_name_both_ranks(rendezvous_url):
    with pytest.raises(comm.CommError, match=r"sum: rank 0 passed array float32 \[3\], rank 1 passed array float32 "):
        in_threads([rendezvous_url], 2, lambda c: c.allreduce(np.zeros(3 + c.rank, np.float32)), timeout_s=3)


def _start_ranks(urls: list[str], world_size: int, op: str, timeout_s: float) -> list[subprocess.Popen]:
    run_id, key = uuid.uuid4().hex[:12], comm.new_key()
    script = str(Path(__file__).with_name("comm_rank.py"))
    procs = []
    for rank in range(world_size):
        spec = {"urls": urls, "rank": rank, "world_size": world_size, "run_id": run_id, "key": key, "op": op,
                "timeout_s": timeout_s}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, script, json.dumps(spec)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))  # fmt: skip
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    return procs


def test_a_killed_rank_is_named_by_the_others_within_their_deadline(channel_url):
    """Two worlds at once, one waiting in an allreduce, one in a barrier (the stores' barriers are their own)."""
    timeout_s = 2.0
    worlds = {op: _start_ranks([channel_url], 4, op, timeout_s) for op in ("allreduce", "barrier")}
    for procs in worlds.values():
        procs[2].kill()
        procs[2].wait()
    time.sleep(timeout_s / 2)  # long enough for its heartbeat to go stale on a store
    survivors = [proc for procs in worlds.values() for proc in (procs[0], procs[1], procs[3])]
    for proc in survivors:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in survivors:
        out, _ = proc.communicate(timeout=timeout_s + 30)
        line = out.strip()
        assert line.startswith("error after"), line
        assert float(line.split()[2]) <= timeout_s + 1.0, line
        assert "rank(s) 2 of run" in line or "rank 2 is gone" in line, line


def test_peers_reach_each_other_at_the_addresses_the_rendezvous_server_saw(rendezvous_url):
    def program(c):
        direct = c.channels[0]
        peer = 1 - c.rank
        seen_by_peer = direct._socks[peer].getpeername()[:2]
        return {"public": tuple(direct.public), "peer_address": direct.addresses[peer], "socket_peer": seen_by_peer,
                "info": c.info()["channels"][0], "sum": c.allreduce(c.rank + 1)}  # fmt: skip

    answers = in_threads([rendezvous_url], 2, program)
    for rank, got in enumerate(answers):
        assert got["sum"] == 3
        assert got["info"]["fallback_pairs"] == [] and got["info"]["fallback"] is None
        assert tuple(got["peer_address"]) == answers[1 - rank]["public"]  # learnt from the server, nowhere else
        assert tuple(got["socket_peer"]) == answers[1 - rank]["public"]  # and the connection is from that port


async def _forward(listen_port_box: list, target: tuple[str, int], ready: threading.Event) -> None:
    """A NAT in front of a rank: it reaches the rendezvous server from a port of the forwarder's own, which
    accepts nothing from outside, so the address the server hands out cannot be connected to."""

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def client(reader, writer):
        up_reader, up_writer = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(client, "127.0.0.1", 0)
    listen_port_box.append(server.sockets[0].getsockname()[1])
    ready.set()
    async with server:
        await server.serve_forever()


def _nat(rendezvous_url: str) -> str:
    host, port = rendezvous_url[len("direct://") :].rsplit(":", 1)
    box, ready = [], threading.Event()
    threading.Thread(target=lambda: asyncio.run(_forward(box, (host, int(port)), ready)), daemon=True).start()
    ready.wait(10)
    return f"direct://127.0.0.1:{box[0]}"


def test_a_pair_that_cannot_connect_talks_through_the_fallback_and_the_record_says_so(rendezvous_url, redis_url):
    behind_nats = [_nat(rendezvous_url), _nat(rendezvous_url)]  # each rank behind a NAT of its own
    run_id, key = uuid.uuid4().hex[:12], comm.new_key()
    answers, errors = [None, None], []

    def rank(r):
        try:
            with comm.connect([behind_nats[r], redis_url], r, 2, run_id, key, 10, connect_timeout_s=1.5) as c:
                answers[r] = {"sum": c.allreduce(np.arange(3) * (r + 1)), "info": c.info()["channels"][0],
                              "bcast": c.bcast(7 if r == 0 else None)}  # fmt: skip
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors
    for got in answers:
        assert got["info"]["fallback_pairs"] == [[0, 1]] and got["info"]["fallback"] == "redis"
        np.testing.assert_array_equal(got["sum"], np.arange(3) * 3)
        assert got["bcast"] == 7


def test_a_runs_record_of_its_collectives_names_the_pairs_that_fell_back(rendezvous_url, redis_url):
    from cai_bench.inference.gathering import CommConfig, finish_together, rank_account

    behind_nats = [_nat(rendezvous_url), _nat(rendezvous_url)]
    run_id, key = uuid.uuid4().hex[:12], comm.new_key()
    accounts = [None, None]

    def rank(r):
        config = CommConfig((behind_nats[r], redis_url), 2, run_id, key, timeout_s=2.0)
        accounts[r] = rank_account(finish_together(config, r, [])[1])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    for r, account in enumerate(accounts):
        assert account["rank"] == r and "error" not in account
        (direct,) = account["fallback"]
        assert direct["scheme"] == "direct" and direct["fallback_pairs"] == [[0, 1]] and direct["fallback"] == "redis"


def test_a_pair_that_cannot_connect_without_a_fallback_is_an_error_naming_the_peer(rendezvous_url):
    behind_nats = [_nat(rendezvous_url), _nat(rendezvous_url)]
    run_id, key = uuid.uuid4().hex[:12], comm.new_key()
    errors = []

    def rank(r):
        try:
            comm.connect([behind_nats[r]], r, 2, run_id, key, 10, connect_timeout_s=1.0).close()
        except comm.CommError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(e.split(" could")[0] for e in errors) == ["rank 0", "rank 1"]
    assert all("no fallback channel was given" in e for e in errors)


def _ask(url: str, request: dict, sock: socket.socket | None = None) -> dict:
    host, port = url[len("direct://") :].rsplit(":", 1)
    sock = sock or socket.create_connection((host, int(port)))
    try:
        return rendezvous((host, int(port)), sock, request, 2)
    except comm.CommError as exc:
        return {"error": str(exc)}


def test_a_peer_of_another_run_can_neither_read_nor_take_over_a_runs_entries(rendezvous_url):
    run = uuid.uuid4().hex[:12]
    host, port = rendezvous_url[len("direct://") :].rsplit(":", 1)
    owner = socket.create_connection((host, int(port)))
    assert "address" in _ask(rendezvous_url, {"op": "register", "run": run, "key": "right", "rank": 0, "world": 2},
                             owner)  # fmt: skip
    # Another key: no addresses, no rank of this run
    assert (
        "belongs to another key"
        in _ask(rendezvous_url, {"op": "peers", "run": run, "key": "wrong", "timeout": 1})["error"]
    )
    stolen = _ask(rendezvous_url, {"op": "register", "run": run, "key": "wrong", "rank": 1, "world": 2})
    assert "belongs to another key" in stolen["error"]
    # The right key, but a rank that a live connection holds: not taken over
    taken = _ask(rendezvous_url, {"op": "register", "run": run, "key": "right", "rank": 0, "world": 2})
    assert "registered by another connection" in taken["error"]
    # And the run's own second rank gets the addresses, its own included
    second = socket.create_connection((host, int(port)))
    assert "address" in _ask(rendezvous_url, {"op": "register", "run": run, "key": "right", "rank": 1, "world": 2},
                             second)  # fmt: skip
    peers = _ask(rendezvous_url, {"op": "peers", "run": run, "key": "right", "timeout": 2}, second)["peers"]
    assert peers["0"] == list(owner.getsockname()[:2]) and peers["1"] == list(second.getsockname()[:2])
    owner.close()
    second.close()


def test_both_ranks_of_a_pair_that_one_side_gave_up_on_fall_back_together(rendezvous_url):
    """Rank 0 connected to rank 1, rank 1 gave up on rank 0 (its deadline came first): the server's answer to
    both is the same pair, so neither talks directly while the other waits on the fallback."""
    run = uuid.uuid4().hex[:12]
    host, port = rendezvous_url[len("direct://") :].rsplit(":", 1)
    ranks = [socket.create_connection((host, int(port))) for _ in range(3)]
    for r, sock in enumerate(ranks):
        assert "address" in _ask(rendezvous_url, {"op": "register", "run": run, "key": "k", "rank": r, "world": 3},
                                 sock)  # fmt: skip
    accounts = {0: [], 1: [0], 2: []}
    answers = [None] * 3

    def settle(r):
        answers[r] = _ask(rendezvous_url, {"op": "settle", "run": run, "key": "k", "rank": r,
                                           "missing": accounts[r], "timeout": 5}, ranks[r])  # fmt: skip

    threads = [threading.Thread(target=settle, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert answers == [{"fallback": [[0, 1]]}] * 3
    # a rank settles only for itself, on its own connection
    other = _ask(rendezvous_url, {"op": "settle", "run": run, "key": "k", "rank": 0, "missing": [], "timeout": 1})
    assert "settles on the connection that registered it" in other["error"]
    bad = _ask(rendezvous_url, {"op": "settle", "run": run, "key": "k", "rank": 2, "missing": [7], "timeout": 1},
               ranks[2])  # fmt: skip
    assert "missing: the ranks of the run" in bad["error"]
    [sock.close() for sock in ranks]


def test_the_policy_picks_direct_when_fast_and_weighs_request_prices_when_cheap():
    models = default_models()
    schemes = ["s3", "redis", "direct"]
    assert choose_channel(schemes, models, "allreduce", 64, 8, "fast") == "direct"
    assert choose_channel(["s3", "redis"], models, "barrier", 64, 8, "fast") == "redis"
    # Cheap weighs money, not time: a Redis node dear enough per hour makes S3's requests the cheaper way, though
    # Redis stays the faster; the functions' GB-seconds while they wait count on both sides
    from dataclasses import replace

    dear = {**models, "redis": replace(models["redis"], hourly_usd=50_000.0)}
    assert choose_channel(["s3", "redis"], dear, "bcast", 2, 8, "fast") == "redis"
    assert choose_channel(["s3", "redis"], dear, "bcast", 2, 8, "cheap") == "s3"
    assert choose_channel(["s3", "redis"], models, "bcast", 2, 8, "cheap") == "redis"
    waiting = (
        estimate(models["s3"], "bcast", 2, 8, memory_gb=10.0)["usd"] - estimate(models["s3"], "bcast", 2, 8)["usd"]
    )
    assert waiting == pytest.approx(2 * 8.0 * estimate(models["s3"], "bcast", 2, 8)["seconds"] * 0.0000166667)
    assert (
        estimate(models["direct"], "allreduce", 32, 8)["seconds"]
        > estimate(models["direct"], "allreduce", 2, 8)["seconds"]
    )
    with pytest.raises(comm.CommError, match="unknown --comm-hint"):
        choose_channel(schemes, models, "bcast", 2, 8, "fastest")


def test_with_several_channels_each_operation_takes_the_one_the_policy_chose(rendezvous_url, redis_url):
    answers = in_threads([redis_url, rendezvous_url], 3, lambda c: (c.allreduce(c.rank), c.info()))
    for total, info in answers:
        assert total == 3
        assert info["operations"]["allreduce"]["channel"] == "direct"


def test_a_run_leaves_on_s3_only_what_its_purge_deletes_and_on_redis_only_keys_that_expire(s3, redis_url):
    import redis

    from cai_bench.comm.s3_channel import purge
    from cai_bench.core import aws

    run_id, key = "cleanup-run", comm.new_key()
    for url in (f"s3://{s3}/comm", redis_url):
        threads = [threading.Thread(target=lambda r=r, u=url: _allreduce_once(u, r, run_id, key)) for r in range(3)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    run_space = comm.space(key, run_id)
    assert run_space.startswith(f"{run_id}-") and len(run_space) > len(run_id) + 16  # not found from the id alone
    listed = aws.s3_client().list_objects_v2(Bucket=s3, Prefix="comm/").get("Contents", [])
    assert sorted(item["Key"].split(f"{run_space}/")[1] for item in listed) == ["alive/0", "alive/1", "alive/2"]
    assert purge(f"s3://{s3}/comm", run_space) == 3
    assert aws.s3_client().list_objects_v2(Bucket=s3, Prefix="comm/").get("KeyCount", 0) == 0
    client = redis.Redis.from_url(redis_url)
    assert client.keys(f"cai-bench:{run_id}:*") == []
    left = client.keys(f"cai-bench:{run_space}:*")
    assert left and all(0 < client.ttl(k) <= 600 for k in left)  # each expires; the messages were all taken


def _allreduce_once(url: str, rank: int, run_id: str, key: str) -> None:
    with comm.connect([url], rank, 3, run_id, key, 10) as c:
        assert c.allreduce(np.ones(4) * rank).tolist() == [3.0] * 4


def test_a_client_that_squats_run_ids_holds_a_few_and_loses_them_when_it_leaves(rendezvous_url):
    """One unauthenticated client registering 1,000 runs and leaving once made every later run of every user
    wait out the TTL: now a connection holds at most a few entries, and they go with it."""
    from cai_bench.comm.rendezvous import MAX_ENTRIES_PER_CONNECTION

    host, port = rendezvous_url[len("direct://") :].rsplit(":", 1)
    squatter = socket.create_connection((host, int(port)))
    runs = [uuid.uuid4().hex[:12] for _ in range(1000)]
    answers = [_ask(rendezvous_url, {"op": "register", "run": r, "key": "squat", "rank": 0, "world": 2}, squatter)
               for r in runs]  # fmt: skip
    taken = [r for r, a in zip(runs, answers, strict=True) if "address" in a]
    assert taken == runs[:MAX_ENTRIES_PER_CONNECTION]
    assert all("at most" in a["error"] for a in answers[MAX_ENTRIES_PER_CONNECTION:])
    # While it is connected its runs are its own; once it has gone, another key may have the same run id
    mine = socket.create_connection((host, int(port)))
    request = {"op": "register", "run": taken[0], "key": "mine", "rank": 0, "world": 1}
    assert "belongs to another key" in _ask(rendezvous_url, request, mine)["error"]
    squatter.close()
    for _ in range(50):  # the server sees the close when its reader does
        answer = _ask(rendezvous_url, request, mine)
        if "address" in answer:
            break
        time.sleep(0.1)
    assert "address" in answer, answer
    peers = _ask(rendezvous_url, {"op": "peers", "run": taken[0], "key": "mine", "timeout": 2}, mine)["peers"]
    assert peers == {"0": list(mine.getsockname()[:2])}
    mine.close()


def test_runs_expire_by_their_deadlines_without_walking_every_run():
    """Runs that stay connected but idle go after the TTL; what is popped is the runs that are due, nothing else."""
    import asyncio

    from cai_bench.comm.rendezvous import Rendezvous

    class Writer:  # the one thing register reads of a connection
        def __init__(self, port: int):
            self.port = port

        def get_extra_info(self, name: str):
            return ("127.0.0.1", self.port)

    server = Rendezvous(ttl_s=0.2)
    for number in range(300):
        request = {"op": "register", "run": f"r{number}", "key": "k", "rank": 0, "world": 2}
        assert "address" in server.register(request, Writer(number))
    assert len(server.runs) == 300
    time.sleep(0.3)
    assert "address" in server.register({"op": "register", "run": "late", "key": "k", "rank": 0, "world": 1},
                                        Writer(9999))  # fmt: skip
    assert list(server.runs) == ["late"] and len(server._deadlines) == 1
    asyncio.run(asyncio.sleep(0))  # (the runs' events belong to no loop until awaited)
