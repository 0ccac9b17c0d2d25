"""The driver's side of ``--comm`` on Lambda, shared by both transports (direct invocations, Step Functions):
the ranks of the first invocation of each group of units, rank 0's aggregate read once, each rank's account."""

from __future__ import annotations

import threading

from cai_bench.backends.aws_lambda.wire import ForgedObject, aggregate_key, read_sealed
from cai_bench.backends.dispatch import Unit
from cai_bench.inference.gathering import CommConfig, rank_account, read_aggregate, record_of


class Gathered:
    """The driver's side of ``--comm`` on Lambda: which invocation is which rank, rank 0's aggregate read once
    for all, what each rank said of its collectives, and how many results were read one by one instead."""

    def __init__(self, config: CommConfig | None, results, sealing: tuple[str, str]):
        """``sealing``: the run's secret for its objects and the run's id (``wire.read_sealed``)."""
        self.config, self.results_prefix, self.sealing = config, results, sealing
        self.lock = threading.Lock()
        self.landed = threading.Event()  # rank 0's reply came (with or without its aggregate)
        self.aggregate: dict = {}
        self.summary: dict | None = None
        self.aggregate_reads = self.unit_reads = 0
        self.by_rank: dict[int, dict] = {}
        self.forged = False  # the aggregate's object failed its seal

    def rank_of(self, units: list[Unit], per_invocation: int) -> int | None:
        """The rank of an invocation of these units: one whole group, on its first attempt; None otherwise (a
        retry runs alone, its group's collectives long over)."""
        if self.config is None or any(u.attempts for u in units):
            return None
        rank = units[0].position // per_invocation
        whole = [u.position for u in units] == list(range(rank * per_invocation, rank * per_invocation + len(units)))
        return rank if whole and rank < self.config.world_size else None

    def failed(self, rank: int, error: str) -> None:
        with self.lock:
            self.by_rank[rank] = {"rank": rank, "error": error}
        if rank == 0:
            self.landed.set()

    def results(self, rank: int, comm: dict | None) -> dict:
        """The results of the aggregate (by position) for an invocation of ``rank``; {} where there is none. Rank
        0 reads it; the others wait for rank 0's reply, unless their own collectives failed."""
        self.heard(rank, comm)
        if (comm or {}).get("aggregate"):
            try:
                self.read_aggregate()
            finally:
                self.landed.set()
        elif rank == 0:
            self.landed.set()
        elif comm and "error" not in comm:
            self.landed.wait(self.config.timeout_s + 60)
        return self.aggregate

    def read_aggregate(self) -> dict:
        """Rank 0's aggregate, read once (its units' results by position); {} where the object there is not this
        run's (rank 0's account then says so, and every unit's own result is read instead)."""
        if self.summary is None and not self.forged:
            try:
                data = read_sealed(self.results_prefix, aggregate_key(self.config.run_id), *self.sealing)
            except ForgedObject as exc:
                self.forged = True
                self.failed(0, str(exc))
                return {}
            self.aggregate, self.summary = read_aggregate(data)
            self.aggregate_reads += 1
        return self.aggregate

    def heard(self, rank: int, comm: dict | None) -> None:
        """What rank ``rank``'s reply said of its collectives, for the record."""
        comm = comm or {"rank": rank, "error": "the reply says nothing of the collectives"}
        with self.lock:
            self.by_rank[rank] = rank_account(comm)

    def summary_for_record(self) -> dict | None:
        if self.config is None:
            return None
        return record_of(self.config, list(self.by_rank.values()), self.summary, self.aggregate_reads, self.unit_reads)
