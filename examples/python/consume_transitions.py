#!/usr/bin/env python3
"""Reads lifecycle-fleet's transition stream through a consumer group, with nothing but redis-py.

    REDIS_URL=redis://127.0.0.1:6379 python3 consume_transitions.py --group billing --consumer billing-1

What a consumer must do (docs/contract.md, "The transition stream"; docs/schemas/stream-entry.json):

- read every partition of the stream: the fleet records their number P at <prefix>:transitions:partitions (absent:
  1), and each deployment's entries are on one partition, in version order (keys: `partition_keys` below);
- follow a change of P (`fleet streams repartition`, which switches only once every group has acknowledged
  everything on the old partitions): go on with the new partitions, the group there from the beginning of the new
  layout, and on a key an earlier P wrote never before its boundary (`<key>:layout`'s `since`: `group_start`);
- read through a consumer group, so a restart resumes where it left off: first its own pending entries (read but
  not acknowledged before it stopped), then new ones with XREADGROUP ... BLOCK;
- drop an entry whose version it has already seen for that deployment: the stream is at-least-once;
- acknowledge an entry once it is handled.

It prints one line per transition:

    <deploymentId> v<version> <from> -> <to> (<reason>) <eventId>

with `(new)` as the from-state of a creation, and one summary line on stderr when it stops. It stops on SIGTERM or
SIGINT after the entry in hand (within --block-ms), after --count transitions, or with --until-idle when a read
finds nothing new.

It takes no part in TransitionConsumer's partition leases: give it a consumer group of its own, never one shared with
TransitionConsumers (they would each hand half a deployment's entries to a different reader). Run one process per
group: the group's consumers split each partition's entries between them, so two would lose per-deployment order.

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
                        help="the fleet's FLEET_PREFIX: the stream is <prefix>:transitions, or its partitions (default: $FLEET_PREFIX, else fleet)")
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


def prefix_hash_tag(key):
    """The hash tag of a key, `t` in `{t}` (the first `{...}` with something inside), or None."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1:end] if end > start + 1 else None


def partition_keys(base, partitions):
    """Every partition's stream key, as the fleet's partitionKey computes it (docs/contract.md, "The transition
    stream", Partitions): P = 1 is the base key itself; untagged, <base>:<n>; with a hash tag {t}, the tag becomes
    {t:p<n>} and :<n> is appended (e.g. {fleet:p3}:transitions:3)."""
    if partitions == 1:
        return [base]
    tag = prefix_hash_tag(base)
    if tag is None:
        return [f"{base}:{n}" for n in range(partitions)]
    return [base.replace("{" + tag + "}", "{" + f"{tag}:p{n}" + "}", 1) + f":{n}" for n in range(partitions)]


def read_partitions(client, base):
    """The number of partitions the fleet recorded (1 when nothing is recorded: a fleet from before partitions)."""
    raw = client.get(f"{base}:partitions")
    if raw is None:
        return 1
    if not raw.isdigit() or not 1 <= int(raw) <= 1024:
        raise SystemExit(f"consume_transitions: {base}:partitions is not a number of partitions (1-1024): {raw[:40]!r}")
    return int(raw)


def stream_id(text):
    """A stream id (`ms-seq`, or `ms`) as a pair, to order ids."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def group_start(client, key, start_id):
    """Where a new group starts on a key: where asked, but never before the key's layout boundary, the last entry an
    earlier number of partitions wrote there (docs/contract.md, "Changing the number of partitions")."""
    if start_id == "$":
        return start_id
    since = client.hget(f"{key}:layout", "since")
    if since is not None and stream_id(start_id) < stream_id(since):
        return since
    return start_id


def slot_of(key):
    """What decides a key's Redis Cluster slot: its hash tag if it has one, else the whole key."""
    tag = prefix_hash_tag(key)
    return tag if tag is not None else key


def describe(url):
    """The Redis URL without its password, for messages."""
    parsed = redis.connection.parse_url(url)
    return f"{parsed.get('host', '127.0.0.1')}:{parsed.get('port', 6379)}"


def main():
    args = parse_args()
    base = f"{args.prefix}:transitions"
    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    stop = Stop()

    def join(partitions, start_id):
        """The partitions' keys, the group made on each where missing, and the keys by slot."""
        keys = partition_keys(base, partitions)
        for key in keys:  # one group per partition, under the same name
            try:
                client.xgroup_create(key, args.group, id=group_start(client, key, start_id), mkstream=True)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):  # the group exists: keep its position
                    raise
        # one XREADGROUP spans the keys of one slot: all of them without a cluster, one partition each with hash tags
        slots = {}
        for key in keys:
            slots.setdefault(slot_of(key), []).append(key)
        return keys, slots

    partitions = read_partitions(client, base)
    keys, slots = join(partitions, args.start_id)
    print(f"reading {base} as {args.group}/{args.consumer} on {describe(args.redis_url)}, {partitions} partition(s)",
          file=sys.stderr, flush=True)

    seen = {}  # deploymentId -> the highest version handled
    printed = dropped = 0

    def done():
        return stop.requested or (args.count is not None and printed >= args.count)

    def handle(key, entries):
        nonlocal printed, dropped
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
            client.xack(key, args.group, entry_id)
            if done():
                return

    # "0": this consumer's own pending entries first, per partition (read before a restart, never acknowledged), so
    # that none of a deployment's newer entries comes before them; then ">" over every partition
    for key in keys:
        while not done():
            reply = client.xreadgroup(args.group, args.consumer, {key: "0"}, count=100)
            entries = reply[0][1] if reply else []
            if not entries:
                break
            handle(key, entries)
    while not done():
        recorded = read_partitions(client, base)
        if recorded != partitions:
            # repartitioned: this group acknowledged everything on the old partitions before the switch, and every
            # entry of the new layout came after it: the group starts there from the layout's beginning
            print(f"{base} now has {recorded} partition(s) (was {partitions}): reading them", file=sys.stderr, flush=True)
            partitions = recorded
            keys, slots = join(partitions, "0")
        # with several slots (a cluster) each read blocks for its share of --block-ms
        block = max(1, args.block_ms // len(slots))
        found = False
        for group_keys in slots.values():
            reply = client.xreadgroup(args.group, args.consumer, {key: ">" for key in group_keys}, count=100, block=block)
            for key, entries in reply or []:
                found = found or bool(entries)
                handle(key, entries)
                if done():
                    break
            if done():
                break
        if not found and args.until_idle:
            break
    print(f"stopped: {printed} transitions printed, {dropped} duplicates dropped", file=sys.stderr, flush=True)
    client.close()


if __name__ == "__main__":
    try:
        main()
    except redis.ConnectionError as err:
        print(f"consume_transitions: Redis is unreachable ({err})", file=sys.stderr)
        sys.exit(4)
