#!/usr/bin/env python3
"""Redis CPU per chat message appended by the gateway's function, by messages per call.

Starts its own redis-server on a free loopback port (never 6379), loads the gateway's
function library (gateway/src/broker/lua/chat.lua), subscribes two "nodes" of two partitions
each to 500 rooms (so every message reaches two subscriber connections, as in bench.sh's
publish scenario), then for each batch size sends append calls one at a time, as a node's
publisher does, optionally paced to a message rate. It reports Redis's CPU (user+system, from
INFO cpu) and the time inside FCALL per message. No gateway, no load generator: this is the
Redis side alone, what a call of that size costs when nothing else competes for the cores.

Usage: loadtest/append-cost.py [--batches 1,5,20,38,64] [--messages 20000] [--rate 10000]
                              [--library a-candidate.lua]
"""

import argparse
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(REPO, "gateway", "src", "broker", "lua", "chat.lua")
ROOMS = [f"room-{i}" for i in range(500)]


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Connection:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = self.sock.makefile("rb")

    def call(self, *args):
        self.sock.sendall(encode(*args))
        return self.read()

    def read(self):
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in b"+:":
            return rest
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.reader.read(size + 2)[:-2]
        if kind == b"*":
            return [self.read() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def info(self, section):
        text = self.call("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def room_key(room, name):
    return f"chat:{{{room}}}:{name}"


def subscribe(port):
    """Two nodes of two partitions: each room on one partition of each node."""
    for _node in range(2):
        for partition in range(2):
            conn = Connection(port)
            channels = [room_key(r, "messages") for i, r in enumerate(ROOMS) if i % 2 == partition]
            conn.sock.sendall(encode("SSUBSCRIBE", *channels))
            threading.Thread(target=drain, args=(conn.sock,), daemon=True).start()


def drain(sock):
    while sock.recv(1 << 20):
        pass


def measure(conn, append, batch, messages, rate):
    frame = (
        '{"type":"message","room":"room-0","id":"%s","userId":"u-1","name":null,'
        '"message":"%s","ts":1700000000000}' % (uuid.uuid4(), "x" * 64)
    )
    calls = messages // batch
    interval = batch / rate if rate else 0
    conn.call("CONFIG", "RESETSTAT")
    before = conn.info("cpu")
    started = time.monotonic()
    for n in range(calls):
        keys, args = [], ["1000", "86400000", "300000", str(time.time_ns() // 1000), "e" * 22, "0" * batch]
        for j in range(batch):
            keys.append(room_key(ROOMS[(n * batch + j) % len(ROOMS)], "history"))
            args.append(frame)
        conn.call("FCALL", append, str(len(keys)), *keys, *args)
        if interval:
            time.sleep(max(0.0, started + (n + 1) * interval - time.monotonic()))
    elapsed = time.monotonic() - started
    after = conn.info("cpu")
    stats = conn.info("commandstats")["cmdstat_fcall"]
    in_fcall = int(stats.split("usec=")[1].split(",")[0])
    sent = calls * batch
    cpu = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_user", "used_cpu_sys"))
    return sent / elapsed, cpu * 1e6 / sent, in_fcall / sent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,5,20,38,64")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=0, help="messages/s (0: as fast as calls return)")
    parser.add_argument("--library", default=LIBRARY, help="the function library to measure")
    options = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", data],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    conn = Connection(port)
                    conn.call("PING")
                    break
                except OSError:
                    time.sleep(0.05)
            with open(options.library) as library:
                code = library.read()
            conn.call("FUNCTION", "LOAD", "REPLACE", code)
            # The library's name carries its version ("#!lua name=chatgw_v3"), as do its functions.
            append = code.splitlines()[0].split("name=", 1)[1].strip() + "_append"
            subscribe(port)
            time.sleep(0.3)
            # Warm up: every room gets its stream and epoch, as in a running cluster.
            measure(conn, append, 50, len(ROOMS), 0)
            print("| messages per call | messages/s | Redis CPU µs / message | in FCALL µs / message |")
            print("| --- | --- | --- | --- |")
            for batch in map(int, options.batches.split(",")):
                rate, cpu, in_fcall = measure(conn, append, batch, options.messages, options.rate)
                print(f"| {batch} | {rate:,.0f} | {cpu:.1f} | {in_fcall:.1f} |")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
