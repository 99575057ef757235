"""How close the event codec gets to bare msgpack, decoding and encoding one representative event.

Prints one JSON object per line: ``name``, ``value`` (events/s through shir's codec), ``unit``,
``baseline`` (events/s through bare msgpack on the same bytes, measured in the same run) and
``ratio`` (value / baseline). Ratios, not absolute rates, are what to compare across machines.

- ``codec_decode`` / ``codec_encode``: one heartbeat-shaped event (8 fields, a nested value
  object, an enum, a tuple), decoded or encoded over and over.
- ``codec_decode_log``: every record of a real log, the first 10 simulated minutes of the
  ``reference`` scenario (~25k records, mostly small job events holding a lease token).

    .venv/bin/python benchmarks/codec_decode.py [--rounds 7] [--n 200000]
"""

from __future__ import annotations

import argparse
import enum
import gc
import json
import statistics
import time
from collections.abc import Callable

import attrs
import msgpack

from shir.core.codec import decode, encode, event, value


class Status(enum.Enum):
    ONLINE = "online"
    LIMITED = "limited"


@value
@attrs.frozen
class Metrics:
    cpu_pct: float
    memory_mb: int
    running_jobs: int
    peers: tuple[str, ...]


@event("bench.heartbeat")
@attrs.frozen
class Heartbeat:
    """Shaped like the events a runtime's log is mostly made of."""

    runtime_id: str
    node_id: str
    term: int
    at: float
    status: Status
    metrics: Metrics
    reason: str
    payload: bytes | None


EVENT = Heartbeat(
    runtime_id="rt-7f3a9c",
    node_id="node-2",
    term=42,
    at=1_733_000_123.25,
    status=Status.LIMITED,
    metrics=Metrics(37.5, 6144, 3, ("node-1", "node-3")),
    reason="heartbeat",
    payload=None,
)
# The same record as plain data: what a hand-written msgpack encoder would pack.
PLAIN = [
    "bench.heartbeat", 1,
    ["rt-7f3a9c", "node-2", 42, 1_733_000_123.25, "limited",
     [37.5, 6144, 3, ["node-1", "node-3"]], "heartbeat", None],
]


def _round(fn: Callable[[], object], n: int) -> float:
    loop = range(n)
    gc.collect()
    start = time.perf_counter()
    for _ in loop:
        fn()
    return n / (time.perf_counter() - start)


def compare(
    fn: Callable[[], object], baseline: Callable[[], object], n: int, rounds: int
) -> tuple[float, float]:
    """Median calls per second of ``fn`` and ``baseline``, over ``rounds`` rounds of ``n``.

    Rounds alternate between the two so drift (CPU boost, other load) hits both alike.
    """
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(_round(fn, n))
        theirs.append(_round(baseline, n))
    return statistics.median(ours), statistics.median(theirs)


def line(name: str, value: float, baseline: float) -> str:
    return json.dumps({
        "name": name,
        "value": round(value),
        "unit": "events/s",
        "baseline": round(baseline),
        "ratio": round(value / baseline, 3),
    })


def reference_log() -> list[bytes]:
    """The records of the reference scenario's first 10 simulated minutes, as written."""
    from shir.sim.scenario import load_scenario
    from shir.sim.world import World

    world = World(load_scenario("reference"), None, 600.0)
    world.run()
    return [encode(e) for e in world.events_log]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median is reported")
    parser.add_argument("--n", type=int, default=200_000, help="calls per round")
    args = parser.parse_args()

    data = encode(EVENT)
    assert decode(data) == EVENT
    assert msgpack.packb(PLAIN) == data, "the baseline must pack exactly the codec's bytes"

    unpackb, packb = msgpack.unpackb, msgpack.packb
    codec_dec, bare_dec = compare(lambda: decode(data), lambda: unpackb(data), args.n, args.rounds)
    codec_enc, bare_enc = compare(lambda: encode(EVENT), lambda: packb(PLAIN), args.n, args.rounds)
    print(line("codec_decode", codec_dec, bare_dec))
    print(line("codec_encode", codec_enc, bare_enc))

    log = reference_log()

    def decode_log() -> None:
        for record in log:
            decode(record)

    def unpack_log() -> None:
        for record in log:
            unpackb(record)

    rounds = max(1, args.n // len(log))
    log_dec, bare_log = compare(decode_log, unpack_log, rounds, args.rounds)
    print(line("codec_decode_log", log_dec * len(log), bare_log * len(log)))


if __name__ == "__main__":
    main()
