"""An out-of-process quire projector in Python: counts scribes per kind into its own SQLite file.

It subscribes as the durable consumer NAME (`Log.Subscribe { consumer: NAME }`), so the node
remembers how far it got: after a restart the node starts it after its last `Log.Ack`.

Exactly-once effect from at-least-once delivery
-----------------------------------------------
The SQLite commit and the node's ack cannot happen atomically (they live in different
processes), so for every scribe this script:

1. in ONE SQLite transaction: reads its own checkpoint; if the scribe's seq <= checkpoint the
   scribe was already counted (it is being redelivered because the process died between its
   commit and its ack) and is skipped; otherwise it increments `counts[kind]` and sets
   `checkpoint = seq`; then commits;
2. calls `Log.Ack(consumer=NAME, seq=seq)`, for counted and skipped scribes alike.

It acks every scribe: simple, and the cost is one small RPC per scribe. A busier consumer would
apply a batch of scribes in one transaction and ack only the batch's last seq; the checkpoint
makes either way safe.

The node owner's token
----------------------
A durable consumer's cursor lives on the node, so subscribing as one and acking change the node:
both need the node owner's token, sent as `authorization: Bearer TOKEN`. The node writes it to
`api.token` in its data directory at first start; pass it with --token or $QUIRE_TOKEN.

Generating the stubs
--------------------
From the repository root (needs `pip install grpcio grpcio-tools`):

    mkdir -p /tmp/quire-stubs
    python3 -m grpc_tools.protoc -I proto \\
        --python_out=/tmp/quire-stubs --grpc_python_out=/tmp/quire-stubs \\
        proto/quire/v1/scribe.proto proto/quire/v1/api.proto

Usage
-----
    PYTHONPATH=/tmp/quire-stubs QUIRE_TOKEN=$(cat ~/.local/share/quire/api.token) \\
        python3 consumer.py --node 127.0.0.1:8000 --name counter --db counter.sqlite \\
        [--stream HEX] [--exit-after N | --until-seq S] [--print-counts]

--token TOKEN    the node owner's token (default: $QUIRE_TOKEN).
--stream HEX     follow one stream (default: the whole log). A consumer name follows one scope
                 for life.
--exit-after N   exit (status 0) after counting N scribes in this run.
--until-seq S    exit (status 0) once the checkpoint is >= S (checked after every scribe and when
                 caught up).
--print-counts   on such an exit, print the counts as one JSON object.

Without --exit-after/--until-seq it runs until killed. It prints `caught up at seq N` once it has
seen every scribe that existed when it subscribed. Exit status 2: the node cannot be reached;
status 1: the node refused (for instance, no token or a wrong one).
"""

import argparse
import json
import os
import sqlite3
import sys

import grpc

from quire.v1 import api_pb2, api_pb2_grpc

CONNECT_TIMEOUT_S = 5.0
EXIT_UNREACHABLE = 2


class Done(Exception):
    """The --exit-after / --until-seq condition holds."""


class Counter:
    """The consumer's own state: `counts(kind, n)` and a one-row `checkpoint(seq)`."""

    def __init__(self, path: str) -> None:
        # Autocommit mode: transactions are begun and committed explicitly below.
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("CREATE TABLE IF NOT EXISTS counts (kind TEXT PRIMARY KEY, n INTEGER NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS checkpoint (seq INTEGER NOT NULL)")
        if self.db.execute("SELECT COUNT(*) FROM checkpoint").fetchone()[0] == 0:
            self.db.execute("INSERT INTO checkpoint (seq) VALUES (0)")
        self.db.execute("COMMIT")

    def checkpoint(self) -> int:
        return self.db.execute("SELECT seq FROM checkpoint").fetchone()[0]

    def apply(self, seq: int, kind: str) -> bool:
        """Counts one scribe unless it is at or below the checkpoint; True if it was counted."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if seq <= self.checkpoint():
                self.db.execute("ROLLBACK")
                return False
            self.db.execute(
                "INSERT INTO counts (kind, n) VALUES (?, 1) ON CONFLICT(kind) DO UPDATE SET n = n + 1",
                (kind,),
            )
            self.db.execute("UPDATE checkpoint SET seq = ?", (seq,))
            self.db.execute("COMMIT")
            return True
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def counts(self) -> dict:
        return dict(self.db.execute("SELECT kind, n FROM counts ORDER BY kind"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Count scribes per kind into SQLite, as a durable quire consumer.")
    parser.add_argument("--node", required=True, help="HOST:PORT of the node's client API")
    parser.add_argument("--name", required=True, help="durable consumer name (letters, digits, '-', '_', '.')")
    parser.add_argument("--db", required=True, help="SQLite file of this consumer's state")
    parser.add_argument("--stream", default="", help="hex id of the stream to follow (default: the whole log)")
    parser.add_argument(
        "--token",
        default=os.environ.get("QUIRE_TOKEN", ""),
        help="the node owner's token, file api.token in its data directory (default: $QUIRE_TOKEN)",
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--exit-after", type=int, metavar="N", help="exit after counting N scribes in this run")
    stop.add_argument("--until-seq", type=int, metavar="S", help="exit once the checkpoint is >= S")
    parser.add_argument("--print-counts", action="store_true", help="print the counts as JSON when exiting on a condition")
    args = parser.parse_args(argv)
    node = args.node
    for prefix in ("http://", "https://"):
        if node.startswith(prefix):
            node = node[len(prefix):]
    args.node = node.rstrip("/")
    args.token = args.token.strip()
    if not args.token:
        parser.error("a durable consumer needs the node owner's token: pass --token or set QUIRE_TOKEN (the node's data directory holds it, file api.token)")
    try:
        args.stream_id = bytes.fromhex(args.stream)
    except ValueError:
        parser.error("--stream must be hex")
    if args.stream and len(args.stream_id) != 32:
        parser.error("--stream must be 64 hex characters")
    return args


def run(args, counter: Counter) -> None:
    channel = grpc.insecure_channel(args.node)
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        unreachable(args.node, f"no answer within {CONNECT_TIMEOUT_S:g} s")
    log = api_pb2_grpc.LogStub(channel)
    # Sent with both calls: the consumer's cursor is the node's to keep.
    owner = (("authorization", "Bearer " + args.token),)

    counted = 0

    def check_done() -> None:
        if args.exit_after is not None and counted >= args.exit_after:
            raise Done
        if args.until_seq is not None and counter.checkpoint() >= args.until_seq:
            raise Done

    events = log.Subscribe(api_pb2.SubscribeRequest(stream=args.stream_id, consumer=args.name), metadata=owner)
    try:
        if args.exit_after is not None and args.exit_after <= 0:
            raise Done
        for event in events:
            which = event.WhichOneof("event")
            if which == "caught_up":
                print(f"caught up at seq {event.caught_up.seq}", flush=True)
                check_done()
            elif which == "scribe":
                entry = event.scribe
                if counter.apply(entry.seq, entry.kind):
                    counted += 1
                # Acked only after the commit: a crash before this line means redelivery, which
                # apply() skips.
                log.Ack(api_pb2.AckRequest(consumer=args.name, seq=entry.seq), metadata=owner)
                check_done()
        # The node ended the subscription (it is shutting down).
        unreachable(args.node, "the node closed the subscription")
    finally:
        events.cancel()
        channel.close()


def unreachable(node: str, why: str) -> None:
    print(f"consumer.py: cannot reach the quire node at {node} ({why}); is `quire serve` running?", file=sys.stderr, flush=True)
    sys.exit(EXIT_UNREACHABLE)


def main(argv) -> int:
    args = parse_args(argv)
    counter = Counter(args.db)
    try:
        run(args, counter)
    except Done:
        if args.print_counts:
            print(json.dumps(counter.counts(), sort_keys=True), flush=True)
        return 0
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            unreachable(args.node, error.details() or str(error.code()))
        if error.code() == grpc.StatusCode.CANCELLED:
            unreachable(args.node, "the subscription was cancelled")
        print(f"consumer.py: the node refused: {error.code().name}: {error.details()}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
