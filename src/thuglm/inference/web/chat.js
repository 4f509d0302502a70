// The chat page: the conversation lives here (the server is stateless) and is sent whole with every question to
// the OpenAI route, whose streamed answer is shown as it comes.
"use strict";

const $ = (id) => document.getElementById(id);
const conversationView = $("conversation");
const input = $("input");
let messages = [];           // [{role: "user" | "assistant", content}], the dialogue so far
let controller = null;       // the AbortController of the answer streaming now

for (const [slider, digits] of [["max-tokens", 0], ["temperature", 2], ["top-p", 2]]) {
  const show = () => { $(slider + "-value").textContent = Number($(slider).value).toFixed(digits); };
  $(slider).addEventListener("input", show);
  show();
}
$("api-key").value = localStorage.getItem("thuglm-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("thuglm-api-key", $("api-key").value); loadModel(); });

function headers() {
  const result = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) result["Authorization"] = "Bearer " + key;
  return result;
}

function setStatus(text) { $("status").textContent = text; }

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !messages.some((m) => m.role === "assistant");
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) {  // no clipboard API outside secure contexts (http on another host): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

function messageView(message) {
  const view = document.createElement("div");
  view.className = "message " + message.role;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "You" : "ChatGLM";
  const body = document.createElement("div");
  body.className = "body";
  const copy = document.createElement("button");
  copy.className = "copy";
  copy.type = "button";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText(message.content, copy));
  view.append(role, body, copy);
  view.update = () => {
    if (message.role === "user") body.textContent = message.content;  // the user's text as typed
    else body.innerHTML = renderMarkdown(message.content);             // escaped first: see markdown.js
  };
  view.update();
  return view;
}

function render() {
  conversationView.replaceChildren(...messages.map(messageView));
  if (!messages.length) conversationView.append(Object.assign(document.createElement("p"),
    {id: "empty", className: "muted", textContent: "Ask anything. Enter sends, Shift+Enter starts a new line."}));
  conversationView.scrollTop = conversationView.scrollHeight;
}

function requestBody() {
  const system = $("system").value.trim();
  return {
    messages: (system ? [{role: "system", content: system}] : []).concat(messages),
    stream: true,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
  };
}

async function answer() {
  const body = requestBody();
  const reply = {role: "assistant", content: ""};
  messages.push(reply);
  render();
  const view = conversationView.lastElementChild;
  view.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  setStatus("Generating…");
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || response.status + " " + response.statusText);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        for (const line of event.split(/\r?\n/)) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            reply.content += delta.content;
            view.update();
            conversationView.scrollTop = conversationView.scrollHeight;
          }
        }
      }
    }
    setStatus("Answered in " + ((performance.now() - started) / 1000).toFixed(1) + " s");
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Stopped.");  // the partial answer stays in the conversation
    } else {
      view.classList.add("error");
      setStatus("Error: " + error.message);
      if (!reply.content) { messages.pop(); view.remove(); }
    }
  } finally {
    view.classList.remove("streaming");
    controller = null;
    setBusy(false);
  }
}

function send() {
  const text = input.value.trim();
  if (!text || controller) return;
  messages.push({role: "user", content: text});
  input.value = "";
  answer();
}

$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
input.addEventListener("keydown", (event) => {
  // While an input method is composing (Chinese pinyin), Enter picks the candidate: it must not send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("regenerate").addEventListener("click", () => {
  if (controller) return;
  while (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  if (messages.length) answer();
});
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  render();
  setStatus("");
  setBusy(false);
});

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (response.status === 401) { setStatus("This server needs an API key: enter it in the settings."); return; }
    const models = await response.json();
    $("model").textContent = models.data.map((m) => m.id).join(", ");
    setStatus("");
  } catch (error) {
    setStatus("Cannot reach the server: " + error.message);
  }
}

setBusy(false);
loadModel();
