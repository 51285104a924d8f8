"""The web chat served at ``/``: one page that talks to this server's
``/v1/chat/completions`` with streaming, keeping the conversation in the browser."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>ExGra-Med chat</title>
<style>
 body { font-family: sans-serif; max-width: 860px; margin: 1.5em auto; color: #222; }
 h1 { font-size: 1.3em; } .row { display: flex; gap: 1.5em; align-items: flex-start; }
 #preview { width: 224px; height: 224px; object-fit: contain; border: 1px solid #ccc;
            background: #f4f4f4; }
 #history { flex: 1; min-height: 224px; border: 1px solid #ccc; padding: .5em;
            overflow-y: auto; max-height: 420px; white-space: pre-wrap; }
 .user { margin: .4em 0; } .assistant { margin: .4em 0 .8em; color: #0a4d8c; }
 .error { color: #b00020; } form { margin-top: 1em; display: flex; gap: .5em; }
 #question { flex: 1; padding: .4em; } .note { font-size: .8em; color: #666; }
</style></head>
<body>
<h1>ExGra-Med chat</h1>
<p class="note">Research demo; not medical advice. Model: <span id="model">?</span></p>
<div class="row">
 <div><img id="preview" alt="no image"><br>
  <input type="file" id="image" accept="image/*,.dcm,application/dicom"></div>
 <div id="history"></div>
</div>
<form id="ask">
 <input id="question" autocomplete="off" placeholder="Ask about the image">
 <button id="send" type="submit">Send</button>
 <button id="reset" type="button">New conversation</button>
</form>
<div id="status" class="note"></div>
<script>
const $ = (id) => document.getElementById(id);
let model = null, image = null, messages = [];
fetch("/v1/models").then((r) => r.json()).then((d) => {
  model = d.data[0].id; $("model").textContent = model;
});
function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls; div.textContent = text;
  $("history").appendChild(div);
  $("history").scrollTop = $("history").scrollHeight;
  return div;
}
function reset() { messages = []; $("history").innerHTML = ""; }
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { image = reader.result; $("preview").src = image; reset(); };
  reader.readAsDataURL(file);
});
$("reset").addEventListener("click", reset);
async function* sseEvents(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      if (event.startsWith("data: ")) yield event.slice(6);
    }
  }
}
$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !model) return;
  // The image goes with the first question of the conversation.
  const content = messages.length === 0 && image
    ? [{type: "text", text: question}, {type: "image_url", image_url: {url: image}}]
    : question;
  line("user", "You: " + question);
  $("question").value = ""; $("send").disabled = true; $("status").textContent = "thinking...";
  const shown = line("assistant", "Assistant: ");
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model, stream: true, temperature: 0,
                            messages: [...messages, {role: "user", content}]})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      answer += chunk.choices[0].delta.content || "";
      shown.textContent = "Assistant: " + answer;
    }
    messages.push({role: "user", content}, {role: "assistant", content: answer});
    shown.classList.add("done");
  } catch (error) {
    shown.remove(); line("error", "Error: " + error.message);
  } finally { $("send").disabled = false; $("status").textContent = ""; }
});
</script>
</body></html>
"""
