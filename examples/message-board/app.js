// The message board: plain JavaScript, no libraries, nothing from the network but this node.
// The page lives at the app's own origin (http://<app label>.localhost:<port>/), so the app's
// API is at relative URLs. It binds to the list `latest` (declared in _schema) over the node's
// live binding: every new message, posted here or on any other node, arrives as a small frame
// within milliseconds — no polling. Posting and searching are function calls on the same socket.
import { connect } from "/_quire/socksync.js";

const list = document.getElementById("messages");
const status = document.getElementById("status");
const search = document.getElementById("search");
const live = connect("/socksync", {
  onstatus: (state) => {
    status.textContent = state === "open" ? "" : "reconnecting to the node…";
  },
  onerror: (message) => {
    status.textContent = message;
  },
});
let latest = [];
let asked = 0; // the newest search: an older answer arriving late is not shown

function render(rows) {
  list.replaceChildren(
    ...rows.map(({ id, author, text, timestamp }) => {
      const item = document.createElement("li");
      item.dataset.id = id;
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = `${author} · ${new Date(timestamp).toLocaleString()}`;
      const body = document.createElement("div");
      body.className = "text";
      body.textContent = text;
      item.append(meta, body);
      return item;
    })
  );
}

live.bindList("latest", (items) => {
  latest = items;
  if (!search.value.trim()) render(latest);
});

async function find() {
  const mine = ++asked;
  const words = search.value.trim();
  if (!words) {
    render(latest);
    return;
  }
  try {
    const answer = await live.call("query", {
      query:
        "SELECT m.id, m.author, m.text, m.timestamp FROM message m JOIN message_fts f ON f.rowid = m.rowid " +
        "WHERE message_fts MATCH ? ORDER BY f.rank LIMIT 50",
      params: [words.split(/\s+/).map((w) => `"${w.replaceAll('"', "")}"`).join(" ")],
    });
    if (mine !== asked) return;
    render(answer.results.map(([id, author, text, timestamp]) => ({ id, author, text, timestamp })));
    status.textContent = "";
  } catch (error) {
    status.textContent = `cannot search: ${error.message}`;
  }
}

document.getElementById("post").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = document.getElementById("text");
  const author = document.getElementById("author");
  try {
    await live.call("add_record", { _table: "message", author: author.value, text: text.value, room: "main" });
    text.value = "";
  } catch (error) {
    status.textContent = `not posted: ${error.message}`;
  }
});

search.addEventListener("input", find);
