// quire's live binding for the browser: django-socksync's protocol over one WebSocket.
// A plain ES module, served by every quire node at /_quire/socksync.js; no build step.
//
//   import { connect } from "/_quire/socksync.js";
//   const live = connect();                          // ws(s)://<this origin>/socksync
//   live.bindList("latest", (items, list) => render(items));
//   live.bindVar("motd", (value) => show(value));
//   const { id } = await live.call("add_record", { _table: "message", text: "hi" });
//
// The connection is reopened with backoff (0.25 s doubling to 10 s) whenever it drops, and every
// binding is subscribed and fetched again, so callbacks see the current value after a
// reconnect. A call in flight when the connection drops is rejected (it may or may not have
// happened: check before retrying a write).

const MAX_BACKOFF_MS = 10_000;

/** Opens the live binding at `url` (default: `socksync` next to the page's origin root). */
export function connect(url = "/socksync", options = {}) {
  return new Live(url, options);
}

class Live {
  constructor(url, options) {
    const absolute = new URL(url, window.location.href);
    absolute.protocol = absolute.protocol === "https:" ? "wss:" : "ws:";
    this.url = absolute.href;
    this.onerror = options.onerror || ((message) => console.warn("socksync:", message));
    this.onstatus = options.onstatus || (() => {});
    this.vars = new Map(); // name -> {callbacks: Set, value}
    this.lists = new Map(); // name -> {callbacks: Set, page, pageSize, state}
    this.functions = new Set();
    this.pending = new Map(); // call id -> {resolve, reject}
    this.queue = []; // frames sent while connecting
    this.backoff = 250;
    this.counter = 0;
    this.closed = false;
    this.open();
  }

  open() {
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => {
      this.backoff = 250;
      for (const name of this.vars.keys()) this.resubscribe("var", name);
      for (const [name, list] of this.lists) {
        this.resubscribe("list", name, { page: list.page, page_size: list.pageSize });
      }
      for (const name of this.functions) this.raw({ func: "subscribe", type: "function", name });
      for (const frame of this.queue.splice(0)) this.raw(frame);
      this.onstatus("open");
    };
    socket.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.receive(frame);
    };
    socket.onclose = () => {
      for (const { reject } of this.pending.values()) {
        reject(new Error("the connection to the node was lost; the call may or may not have happened"));
      }
      this.pending.clear();
      if (this.closed) return;
      this.onstatus("closed");
      setTimeout(() => this.open(), this.backoff);
      this.backoff = Math.min(this.backoff * 2, MAX_BACKOFF_MS);
    };
  }

  /** Closes the connection for good. */
  close() {
    this.closed = true;
    this.socket.close();
  }

  raw(frame) {
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  send(frame) {
    if (this.socket.readyState === WebSocket.OPEN) this.raw(frame);
    else if (!["subscribe", "get"].includes(frame.func)) this.queue.push(frame);
    // Subscriptions and gets are sent again on open anyway.
  }

  resubscribe(type, name, fields = {}) {
    this.raw({ func: "subscribe", type, name });
    this.raw({ func: "get", type, name, ...fields });
  }

  /** Calls `callback(value)` now (once known) and on every change of kv key `name`. */
  bindVar(name, callback) {
    let entry = this.vars.get(name);
    if (!entry) {
      entry = { callbacks: new Set(), value: undefined };
      this.vars.set(name, entry);
      this.send({ func: "subscribe", type: "var", name });
      this.send({ func: "get", type: "var", name });
    } else if (entry.value !== undefined) {
      callback(entry.value);
    }
    entry.callbacks.add(callback);
    return () => this.unbind(this.vars, "var", name, callback);
  }

  /**
   * Calls `callback(items, list)` with one page of list `name` and after every change of it;
   * `list` is `{page, page_size, total_item_count, items}`. Returns a handle whose
   * `page(n, pageSize?)` moves to another page and `unbind()` stops.
   */
  bindList(name, callback, { page = 0, pageSize } = {}) {
    let entry = this.lists.get(name);
    if (!entry) {
      entry = { callbacks: new Set(), page, pageSize, state: null };
      this.lists.set(name, entry);
      this.send({ func: "subscribe", type: "list", name });
      this.send({ func: "get", type: "list", name, page, page_size: pageSize });
    } else if (entry.state) {
      callback(entry.state.items, entry.state);
    }
    entry.callbacks.add(callback);
    return {
      page: (n, size = entry.pageSize) => {
        entry.page = n;
        entry.pageSize = size;
        this.send({ func: "get", type: "list", name, page: n, page_size: size });
      },
      unbind: () => this.unbind(this.lists, "list", name, callback),
    };
  }

  unbind(groups, type, name, callback) {
    const entry = groups.get(name);
    if (!entry) return;
    entry.callbacks.delete(callback);
    if (entry.callbacks.size === 0) {
      groups.delete(name);
      this.send({ func: "unsubscribe", type, name });
    }
  }

  /** Calls function `name` (add_record, upvote, query, kv_set, kv_delete); resolves to its value. */
  call(name, args = {}) {
    if (!this.functions.has(name)) {
      this.functions.add(name);
      this.send({ func: "subscribe", type: "function", name });
    }
    const id = `${Date.now().toString(36)}-${(this.counter++).toString(36)}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.send({ func: "call", type: "function", name, id, args });
    });
  }

  receive(frame) {
    if (frame.func === "error") {
      const failed = /^call (\S+) of \S+ failed: ([\s\S]*)$/.exec(frame.message || "");
      const call = failed && this.pending.get(failed[1]);
      if (call) {
        this.pending.delete(failed[1]);
        call.reject(new Error(failed[2]));
      } else {
        this.onerror(frame.message, frame.error_code);
      }
      return;
    }
    if (frame.type === "function" && frame.func === "return") {
      const call = this.pending.get(frame.id);
      if (call) {
        this.pending.delete(frame.id);
        call.resolve(frame.value);
      }
      return;
    }
    if (frame.type === "var" && frame.func === "set") {
      const entry = this.vars.get(frame.name);
      if (!entry) return;
      entry.value = frame.value;
      for (const callback of entry.callbacks) callback(frame.value);
      return;
    }
    if (frame.type === "list") {
      const entry = this.lists.get(frame.name);
      if (!entry) return;
      if (frame.func === "set_all") {
        entry.state = {
          page: frame.page,
          page_size: frame.page_size,
          total_item_count: frame.total_item_count,
          items: frame.items,
        };
      } else if (!entry.state) {
        return;
      } else if (frame.func === "set_count") {
        entry.state.total_item_count = frame.total_item_count;
      } else if (frame.func === "insert") {
        entry.state.items.splice(frame.index, 0, frame.value);
      } else if (frame.func === "delete") {
        entry.state.items.splice(frame.index, 1);
      } else if (frame.func === "set") {
        entry.state.items[frame.index] = frame.value;
      } else {
        return;
      }
      // Callbacks run once per frame; a burst of frames ends with the exact page.
      for (const callback of entry.callbacks) callback(entry.state.items, entry.state);
    }
  }
}
