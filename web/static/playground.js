// The chatqueue playground: submit with POST /v1/chat/completions, then read
// the answer from GET /v1/chat/response?uid= as it streams. fetch() reads the
// Server-Sent Events (rather than EventSource) so that an API key can go in
// the Authorization header.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_RESUMES = 10;
const RESUME_PAUSE_MS = 500;
const history = [];

for (const id of ["model", "api-key"]) {
  $(id).value = localStorage.getItem("chatqueue." + id) || "";
  $(id).addEventListener("change", () => localStorage.setItem("chatqueue." + id, $(id).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function failure(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// Calls onEvent({id, type, data}) for each event of an SSE body, until it ends.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const event = { id: null, type: "message", data: [] };
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(value);
        else if (field === "id") event.id = value;
        else if (field === "event") event.type = value;
      }
      const item = { id: event.id, type: event.type, data: event.data.join("\n") };
      if (event.data.length && onEvent(item) === false) {
        reader.cancel();
        return;
      }
    }
  }
}

async function ask(prompt) {
  history.push({ role: "user", content: prompt });
  bubble("user", prompt);
  const out = bubble("assistant", "");
  out.dataset.state = "waiting";
  const request = { messages: history, stream: true, username: "playground" };
  const model = $("model").value.trim();
  if (model) request.model = model;

  const submitted = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(request),
  });
  if (submitted.status !== 202) throw new Error(await failure(submitted));
  const { uid } = await submitted.json();
  out.dataset.uid = uid;

  // Read the answer; when the connection drops before [DONE] (a deploy, a
  // network change), read it again with Last-Event-ID, as EventSource does:
  // the web front sends what follows that event.
  let text = "";
  let error = null;
  let lastId = null;
  let finished = false;
  for (let resumes = 0; !finished && !error; resumes++) {
    const h = headers();
    if (lastId !== null) h["Last-Event-ID"] = lastId;
    try {
      const stream = await fetch("/v1/chat/response?uid=" + encodeURIComponent(uid), { headers: h });
      if (!stream.ok) throw new Error(await failure(stream));
      out.dataset.state = "streaming";
      await readEvents(stream, ({ id, type, data }) => {
        if (type === "queue") {
          // The request waits for the LLM: its place (1 = next), until it starts.
          const { position, estimated_wait_seconds: wait } = JSON.parse(data);
          if (position > 0 && !text) {
            out.dataset.state = "waiting";
            out.dataset.position = String(position);
            out.textContent = "waiting: " + (position - 1) + " ahead" +
              (wait === null ? "" : ", about " + Math.ceil(wait) + " s");
          } else if (!text) {
            out.dataset.state = "streaming";
            out.textContent = "";
          }
          return true;
        }
        if (id !== null) lastId = id;
        if (data === "[DONE]") {
          finished = true;
          return false;
        }
        if (id === "0" && text) text = ""; // a worker restarted the answer
        const payload = JSON.parse(data);
        if (payload.error) {
          error = payload.error.message;
          return true;
        }
        const choice = (payload.choices || [])[0];
        if (choice) text += (choice.delta ? choice.delta.content : choice.message && choice.message.content) || "";
        out.textContent = text;
        out.scrollIntoView({ block: "end" });
        return true;
      });
    } catch (err) {
      if (!(err instanceof TypeError)) throw err; // TypeError: the network failed
    }
    if (!finished && !error) {
      if (resumes >= MAX_RESUMES) throw new Error("the answer broke off; it waits in its queue");
      out.dataset.resumes = String(resumes + 1);
      await new Promise((resolve) => setTimeout(resolve, RESUME_PAUSE_MS));
    }
  }
  out.dataset.state = "done";
  if (error) throw new Error(error);
  history.push({ role: "assistant", content: text });
}

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  $("prompt").value = "";
  $("send").disabled = true;
  try {
    await ask(prompt);
  } catch (err) {
    bubble("error", String(err.message || err));
    const waiting = document.querySelector('.assistant[data-state="waiting"], .assistant[data-state="streaming"]');
    if (waiting) waiting.dataset.state = "done";
  } finally {
    $("send").disabled = false;
    $("prompt").focus();
  }
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("clear").addEventListener("click", () => {
  history.length = 0;
  $("messages").replaceChildren();
});
