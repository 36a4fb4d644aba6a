// The blip3o-engine playground: plain JavaScript against the server's own OpenAI-compatible API
// (/v1/chat/completions and /v1/images/* with stream: true). No build step, no external scripts.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, chat: [], chatImage: null, conditionImage: null, abort: null };

// ------------------------------------------------------------------ helpers

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.classList.toggle("hidden", !message);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

// Server-sent events from a fetch() response: calls onEvent(eventName, data) for each, data parsed from JSON
// (or the raw string "[DONE]").
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (!data.length) continue;
        const text = data.join("\n");
        onEvent(event, text === "[DONE]" ? text : JSON.parse(text));
      }
    }
  } catch (e) {
    reader.cancel().catch(() => {});  // closes the connection: the server aborts the request
    throw e;
  }
}

function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// ------------------------------------------------------------------ setup

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers(false) });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    state.model = body.data[0].id;
    $("model-name").textContent = `model: ${state.model}`;
    $("tab-image").disabled = body.data[0].can_generate_images === false;
    showError("");
  } catch (e) {
    $("model-name").textContent = "not connected";
    showError(`cannot list the models (${e.message}); enter the API key if the server needs one`);
  }
}

function setupTabs() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const other of document.querySelectorAll(".tab")) {
        other.classList.toggle("active", other === tab);
        $(other.dataset.panel).classList.toggle("hidden", other !== tab);
      }
    });
  }
}

// ------------------------------------------------------------------ chat

function addBubble(role, text, imageURL) {
  const bubble = document.createElement("div");
  bubble.className = `bubble ${role}`;
  if (imageURL) {
    const img = document.createElement("img");
    img.src = imageURL;
    img.className = "thumb";
    bubble.appendChild(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  bubble.appendChild(body);
  $("chat-log").appendChild(bubble);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return { bubble, body };
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.abort) return;
  const content = [{ type: "text", text }];
  if (state.chatImage) content.unshift({ type: "image_url", image_url: { url: state.chatImage } });
  addBubble("user", text, state.chatImage);
  state.chat.push({ role: "user", content });
  $("chat-input").value = "";
  clearChatImage();

  const reply = addBubble("assistant", "");
  reply.bubble.classList.add("streaming");
  const controller = new AbortController();
  setBusy("chat", controller);
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: state.model, messages: state.chat, stream: true,
        max_tokens: Number($("chat-max-tokens").value) || 128,
        temperature: Number($("chat-temperature").value) || 0,
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (name, data) => {
      if (data === "[DONE]") return;
      if (data.error) throw new Error(data.error.message);
      for (const choice of data.choices) {
        if (choice.delta.content) {
          answer += choice.delta.content;
          reply.body.textContent = answer;
        }
        if (choice.finish_reason) reply.bubble.dataset.finishReason = choice.finish_reason;
      }
    });
    state.chat.push({ role: "assistant", content: answer });
    showError("");
  } catch (e) {
    state.chat.pop();
    if (e.name !== "AbortError") showError(`chat failed: ${e.message}`);
  } finally {
    reply.bubble.classList.remove("streaming");
    reply.bubble.classList.add("done");
    setBusy("chat", null);
  }
}

function clearChatImage() {
  state.chatImage = null;
  $("chat-image").value = "";
  $("chat-image-preview").classList.add("hidden");
}

// ------------------------------------------------------------------ images

function progressTracker(stepsDit, stepsDecoder) {
  const offsets = { prefill: 0, dit: 1, decoder: 1 + stepsDit, vae: 1 + stepsDit + stepsDecoder };
  const total = offsets.vae + 1;
  $("image-progress").max = total;
  $("image-progress").value = 0;
  return (ev) => {
    const done = offsets[ev.stage] + (ev.stage === "prefill" || ev.stage === "vae" ? 1 : ev.step);
    $("image-progress").value = Math.max($("image-progress").value, done);
    $("image-stage").textContent = `${ev.stage} ${ev.step}/${ev.total}`;
  };
}

async function generateImage(event) {
  event.preventDefault();
  if (state.abort) return;
  const fields = {
    prompt: $("image-prompt").value, stream: true, stream_progress: true,
    partial_images: intOrNull("image-partials") ?? 0, output_format: "png",
    seed: intOrNull("image-seed"), size: $("image-size").value.trim() || null,
    num_inference_steps: intOrNull("image-steps"), guidance_scale: intOrNull("image-guidance"),
    dit_steps: intOrNull("image-dit-steps"), dit_guidance_scale: intOrNull("image-dit-guidance"),
  };
  if (state.model) fields.model = state.model;
  for (const k of Object.keys(fields)) if (fields[k] === null) delete fields[k];

  const onProgress = progressTracker(fields.dit_steps ?? 30, fields.num_inference_steps ?? 50);
  const controller = new AbortController();
  setBusy("image", controller);
  $("image-caption").textContent = "";
  $("image-result").dataset.final = "false";
  try {
    let request;
    if (state.conditionImage) {  // image-conditioned: multipart upload to /v1/images/edits
      const form = new FormData();
      form.append("image", state.conditionImage);
      for (const [k, v] of Object.entries(fields)) form.append(k, String(v));
      request = { method: "POST", headers: headers(false), body: form };
    } else {
      request = { method: "POST", headers: headers(), body: JSON.stringify(fields) };
    }
    const url = state.conditionImage ? "/v1/images/edits" : "/v1/images/generations";
    const response = await fetch(url, { ...request, signal: controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (name, data) => {
      if (data === "[DONE]") return;
      if (data.error) throw new Error(data.error.message);
      if (data.type.endsWith(".progress")) onProgress(data);
      else if (data.type.endsWith(".partial_image")) showImage(data, false);
      else if (data.type.endsWith(".completed")) {
        showImage(data, true);
        $("image-progress").value = $("image-progress").max;
        $("image-stage").textContent = "done";
        $("image-caption").textContent = `${data.size}, seed ${data.seed}`;
      }
    });
    showError("");
  } catch (e) {
    if (e.name !== "AbortError") showError(`image generation failed: ${e.message}`);
    $("image-stage").textContent = "stopped";
  } finally {
    setBusy("image", null);
  }
}

function showImage(event, final) {
  const img = $("image-result");
  img.src = `data:image/${event.output_format};base64,${event.b64_json}`;
  img.dataset.final = String(final);
  img.classList.remove("hidden");
  img.classList.toggle("preview", !final);
}

// ------------------------------------------------------------------ wiring

function setBusy(kind, controller) {
  state.abort = controller;
  $(`${kind}-stop`).disabled = !controller;
  $(kind === "chat" ? "chat-send" : "image-generate").disabled = !!controller;
}

function wire() {
  const saved = localStorage.getItem("blip3o-api-key");
  if (saved) $("api-key").value = saved;
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("blip3o-api-key", $("api-key").value.trim());
    loadModel();
  });
  setupTabs();
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-image").addEventListener("change", async () => {
    const file = $("chat-image").files[0];
    if (!file) return clearChatImage();
    state.chatImage = await fileToDataURL(file);
    $("chat-image-preview").src = state.chatImage;
    $("chat-image-preview").classList.remove("hidden");
  });
  $("chat-clear").addEventListener("click", () => { state.chat = []; $("chat-log").textContent = ""; });
  $("image-form").addEventListener("submit", generateImage);
  $("image-condition").addEventListener("change", () => { state.conditionImage = $("image-condition").files[0] || null; });
  for (const kind of ["chat", "image"]) {
    $(`${kind}-stop`).addEventListener("click", () => state.abort && state.abort.abort());
  }
  loadModel();
}

wire();
