// The message board: plain JavaScript, no libraries, nothing from the network but this node.
// The page lives at /<app id>/index.html, so the app's API is at relative URLs: `query` and
// `add_record` (the flock API of the quire node serving it).
"use strict";

const list = document.getElementById("messages");
const status = document.getElementById("status");
const search = document.getElementById("search");
let shown = "";
let asked = 0; // the newest refresh: an older answer arriving late is not shown

async function call(action, body) {
  const reply = await fetch(action, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await reply.json();
  if (!answer.success) throw new Error(answer.error);
  return answer;
}

function render(rows) {
  const key = JSON.stringify(rows);
  if (key === shown) return;
  shown = key;
  list.replaceChildren(
    ...rows.map(([id, author, text, timestamp]) => {
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

async function refresh() {
  const mine = ++asked;
  try {
    const words = search.value.trim();
    const answer = words
      ? await call("query", {
          query:
            "SELECT m.id, m.author, m.text, m.timestamp FROM message m JOIN message_fts f ON f.rowid = m.rowid " +
            "WHERE message_fts MATCH ? ORDER BY f.rank LIMIT 50",
          params: [words.split(/\s+/).map((w) => `"${w.replaceAll('"', "")}"`).join(" ")],
        })
      : await call("query", {
          query: "SELECT id, author, text, timestamp FROM message ORDER BY timestamp DESC, id LIMIT 50",
        });
    if (mine !== asked) return;
    render(answer.results);
    status.textContent = "";
  } catch (error) {
    status.textContent = `cannot load messages: ${error.message}`;
  }
}

document.getElementById("post").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = document.getElementById("text");
  const author = document.getElementById("author");
  try {
    await call("add_record", { _table: "message", author: author.value, text: text.value, room: "main" });
    text.value = "";
    await refresh();
  } catch (error) {
    status.textContent = `not posted: ${error.message}`;
  }
});

search.addEventListener("input", refresh);
refresh();
// New messages from other nodes arrive by replication; poll for them.
setInterval(refresh, 1000);
