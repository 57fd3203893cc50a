#!/usr/bin/env python3
"""Prints N distinct TCP ports that are free on 127.0.0.1 right now, on one line.

    scripts/free-ports.py N

For scripts that start servers of their own on loopback. All N sockets are bound at once, so
the ports differ; another process may still take one before the caller binds it.
"""
import socket
import sys

sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
