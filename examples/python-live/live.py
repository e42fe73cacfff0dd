#!/usr/bin/env python3
"""quire's live binding from Python: django-socksync's protocol over a standard WebSocket client
(the `websockets` package: `pip install websockets`).

    python3 live.py HOST:PORT STREAM_ID [LIST] [VAR]

Connects to ws://HOST:PORT/<stream>/socksync (with the node owner's token from $QUIRE_TOKEN when
set: without it the client may read and `query`, not write), binds list LIST (default `latest`)
and kv key VAR (default `motd`), then, as the owner, adds a record and sets the key, and prints
each frame as it arrives and what the client holds after it. It ends with one JSON line: the
page and the value it holds, and how long the node took to push each change.
"""

import json
import os
import sys
import time

from websockets.sync.client import connect


class Live:
    """One connection: the vars and list pages it holds, kept current by the node's frames."""

    def __init__(self, url, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.socket = connect(url, additional_headers=headers)
        self.vars = {}
        self.lists = {}
        self.returns = {}
        self.next_id = 0

    def send(self, **frame):
        self.socket.send(json.dumps(frame))

    def bind_var(self, name):
        self.send(func="subscribe", type="var", name=name)
        self.send(func="get", type="var", name=name)

    def bind_list(self, name, page=0, page_size=None):
        self.send(func="subscribe", type="list", name=name)
        get = {"func": "get", "type": "list", "name": name, "page": page}
        if page_size:
            get["page_size"] = page_size
        self.send(**get)

    def call(self, name, **args):
        """Sends a call; its answer arrives as a `return` frame (see `returns`)."""
        self.next_id += 1
        call_id = f"py-{self.next_id}"
        self.send(func="subscribe", type="function", name=name)
        self.send(func="call", type="function", name=name, id=call_id, args=args)
        return call_id

    def receive(self, timeout=10):
        """Reads one frame and applies it; returns it."""
        frame = json.loads(self.socket.recv(timeout=timeout))
        kind, func = frame.get("type"), frame["func"]
        if func == "error":
            raise RuntimeError(f"error {frame['error_code']}: {frame['message']}")
        if kind == "var" and func == "set":
            self.vars[frame["name"]] = frame["value"]
        elif kind == "function" and func == "return":
            self.returns[frame["id"]] = frame.get("value")
        elif kind == "list":
            page = self.lists.get(frame["name"])
            if func == "set_all":
                self.lists[frame["name"]] = {
                    "page": frame["page"],
                    "page_size": frame["page_size"],
                    "total": frame["total_item_count"],
                    "items": frame["items"],
                }
            elif func == "set_count":
                page["total"] = frame["total_item_count"]
            elif func == "insert":
                page["items"].insert(frame["index"], frame["value"])
            elif func == "delete":
                del page["items"][frame["index"]]
            elif func == "set":
                page["items"][frame["index"]] = frame["value"]
        return frame

    def until(self, done, timeout=10):
        """Reads frames until `done()` holds."""
        deadline = time.monotonic() + timeout
        while not done():
            frame = self.receive(timeout=max(0.01, deadline - time.monotonic()))
            print("frame:", json.dumps(frame), file=sys.stderr)


def main():
    address, stream = sys.argv[1], sys.argv[2]
    list_name = sys.argv[3] if len(sys.argv) > 3 else "latest"
    var_name = sys.argv[4] if len(sys.argv) > 4 else "motd"
    live = Live(f"ws://{address}/{stream}/socksync", os.environ.get("QUIRE_TOKEN"))
    live.bind_list(list_name, page_size=10)
    live.bind_var(var_name)
    live.until(lambda: list_name in live.lists and var_name in live.vars)
    before = live.lists[list_name]["total"]

    started = time.monotonic()
    added = live.call("add_record", _table="message", author="py", text="hello from Python")
    live.until(lambda: added in live.returns and live.lists[list_name]["total"] == before + 1)
    record_ms = (time.monotonic() - started) * 1000

    started = time.monotonic()
    live.call("kv_set", key=var_name, value={"text": "set from Python"})
    live.until(lambda: live.vars.get(var_name) == {"text": "set from Python"})
    var_ms = (time.monotonic() - started) * 1000

    print(json.dumps({
        "record": live.returns[added],
        "list": live.lists[list_name],
        "var": live.vars[var_name],
        "record_ms": round(record_ms, 2),
        "var_ms": round(var_ms, 2),
    }))


if __name__ == "__main__":
    main()
