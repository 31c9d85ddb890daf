#!/usr/bin/env python3
"""Reads lifecycle-fleet's transition stream through a consumer group, with nothing but redis-py.

    REDIS_URL=redis://127.0.0.1:6379 python3 consume_transitions.py --group billing --consumer billing-1

What a consumer must do (docs/contract.md, "The transition stream"; docs/schemas/stream-entry.json):

- read through a consumer group, so a restart resumes where it left off: first its own pending entries (read but
  not acknowledged before it stopped), then new ones with XREADGROUP ... BLOCK;
- drop an entry whose version it has already seen for that deployment: the stream is at-least-once;
- acknowledge an entry once it is handled.

It prints one line per transition:

    <deploymentId> v<version> <from> -> <to> (<reason>) <eventId>

with `(new)` as the from-state of a creation, and one summary line on stderr when it stops. It stops on SIGTERM or
SIGINT after the entry in hand (within --block-ms), after --count transitions, or with --until-idle when a read
finds nothing new.

Not done here, and done by the fleet's own TransitionConsumer: claiming entries left pending by a consumer that
died (XAUTOCLAIM), keeping the seen versions across restarts (keep them with your own state), and noticing that the
group fell behind the stream's retention (then read GET /api/deployments/:id/transitions?afterVersion=).
"""
import argparse
import os
import signal
import socket
import sys

import redis  # Debian: python3-redis


def parse_args():
    parser = argparse.ArgumentParser(description="Print lifecycle-fleet transitions read through a consumer group.")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
                        help="Redis URL (default: $REDIS_URL, else redis://127.0.0.1:6379)")
    parser.add_argument("--prefix", default=os.environ.get("FLEET_PREFIX", "fleet"),
                        help="the fleet's FLEET_PREFIX: the stream is <prefix>:transitions (default: $FLEET_PREFIX, else fleet)")
    parser.add_argument("--group", default=os.environ.get("CONSUMER_GROUP", "python-example"),
                        help="consumer group (default: $CONSUMER_GROUP, else python-example)")
    parser.add_argument("--consumer", default=os.environ.get("CONSUMER_NAME", f"{socket.gethostname()}-{os.getpid()}"),
                        help="consumer name within the group (default: $CONSUMER_NAME, else <host>-<pid>)")
    parser.add_argument("--start-id", default="$",
                        help="where a new group starts: $ (new entries only, the default), 0 (everything retained) or a stream id")
    parser.add_argument("--count", type=int, default=None, help="stop after this many transitions printed")
    parser.add_argument("--until-idle", action="store_true", help="stop when a read finds nothing new")
    parser.add_argument("--block-ms", type=int, default=2000,
                        help="how long a read waits for new entries (default 2000); bounds how long a stop takes")
    args = parser.parse_args()
    if args.count is not None and args.count < 1:
        parser.error("--count: must be at least 1")
    if args.block_ms < 1:
        parser.error("--block-ms: must be at least 1")
    return args


class Stop:
    """Set by SIGTERM/SIGINT: the loop finishes the entry in hand, then stops."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.request)
        signal.signal(signal.SIGINT, self.request)

    def request(self, _signum, _frame):
        self.requested = True


def describe(url):
    """The Redis URL without its password, for messages."""
    parsed = redis.connection.parse_url(url)
    return f"{parsed.get('host', '127.0.0.1')}:{parsed.get('port', 6379)}"


def main():
    args = parse_args()
    stream = f"{args.prefix}:transitions"
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    stop = Stop()
    try:
        client.xgroup_create(stream, args.group, id=args.start_id, mkstream=True)
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):  # the group exists: keep its position
            raise
    print(f"reading {stream} as {args.group}/{args.consumer} on {describe(args.redis_url)}", file=sys.stderr, flush=True)

    seen = {}  # deploymentId -> the highest version handled
    printed = dropped = 0
    # "0": this consumer's own pending entries first (read before a restart, never acknowledged); ">" once none is left
    position = "0"
    while not stop.requested and (args.count is None or printed < args.count):
        block = None if position == "0" else args.block_ms
        reply = client.xreadgroup(args.group, args.consumer, {stream: position}, count=100, block=block)
        entries = reply[0][1] if reply else []
        if not entries:
            if position == "0":
                position = ">"
                continue
            if args.until_idle:
                break
            continue
        for entry_id, fields in entries:
            if fields:  # a pending entry trimmed from the stream comes back without fields: nothing to handle
                deployment, version = fields["deploymentId"], int(fields["version"])
                if version <= seen.get(deployment, 0):
                    dropped += 1
                else:
                    start = fields["from"] or "(new)"
                    print(f"{deployment} v{version} {start} -> {fields['to']} ({fields['reason']}) {fields['eventId']}", flush=True)
                    seen[deployment] = version
                    printed += 1
            client.xack(stream, args.group, entry_id)
            if stop.requested or (args.count is not None and printed >= args.count):
                break
    print(f"stopped: {printed} transitions printed, {dropped} duplicates dropped", file=sys.stderr, flush=True)
    client.close()


if __name__ == "__main__":
    try:
        main()
    except redis.ConnectionError as err:
        print(f"consume_transitions: Redis is unreachable ({err})", file=sys.stderr)
        sys.exit(4)
