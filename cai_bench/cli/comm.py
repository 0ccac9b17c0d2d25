"""``comm rendezvous`` and ``comm bench``: the direct channel's rendezvous server, and the channels' latency."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from cai_bench.benches.comm import OPS, comm_bench
from cai_bench.cli import options as o
from cai_bench.cli.app import comm_app
from cai_bench.comm.rendezvous import serve
from cai_bench.core.errors import UserError
from cai_bench.render import console, run_views

ALL_OPS = ",".join(OPS)
Host = Annotated[str, typer.Option(help="Address to listen on (loopback by default; 0.0.0.0 for other machines).")]
Port = Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one, printed).")]
Ttl = Annotated[float, typer.Option("--ttl", min=1, help="Seconds a rank's entry is kept.")]
Channels = Annotated[
    list[str], typer.Option("--channel", help="A channel URL: direct://, redis:// or s3://; repeatable.")
]
WorldSizes = Annotated[str, typer.Option("--world-sizes", help="Ranks (local processes), comma-separated.")]
Sizes = Annotated[str, typer.Option("--sizes", help="Message sizes in bytes for bcast and allreduce, comma-separated.")]
Ops = Annotated[str, typer.Option("--ops", help=f"Operations, comma-separated: {', '.join(OPS)}.")]
Repeats = Annotated[int, typer.Option(help="Timed calls per point (after the warm-ups).")]
Warmup = Annotated[int, typer.Option(help="Untimed calls first.")]
Timeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds a rank waits for any one operation.")]


CommResults = Annotated[
    Path, typer.Option("--results", help="Results directory; the points are appended to RESULTS/comm.jsonl.")
]


@comm_app.command("rendezvous")
def comm_rendezvous(host: Host = "127.0.0.1", port: Port = 7077, ttl: Ttl = 600.0) -> None:
    """The rendezvous server of direct:// channels: runs until Ctrl-C."""
    try:
        asyncio.run(serve(host, port, ttl, ready=lambda bound: console.say(f"rendezvous listening on {host}:{bound}")))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})") from None


@comm_app.command("bench")
def comm_bench_command(
    channel: Channels,
    world_sizes: WorldSizes = "2,4,8,16,32",
    sizes: Sizes = "8,1048576",
    ops: Ops = ALL_OPS,
    repeats: Repeats = 20,
    warmup: Warmup = 3,
    timeout: Timeout = 30.0,
    results: CommResults = Path("results"),
) -> None:
    """Latency of barrier, bcast and allreduce per world size and message size; ranks are local processes."""
    points = comm_bench(
        channel,
        o.comma_list(world_sizes, "--world-sizes", int),
        o.comma_list(sizes, "--sizes", int),
        o.comma_list(ops, "--ops"),
        repeats,
        warmup,
        timeout,
        results,
    )
    run_views.show_comm_points(points, Path(results))
