// The live page: every edit schedules a request (debounced); a newer request aborts the one before it, and an
// answer that arrives after a newer request started is dropped, so the images always match the prompt shown.
"use strict";
const DEBOUNCE_MS = 200;
const GALLERY_SIZE = 12;
const $ = (id) => document.getElementById(id);
let timer = null;
let inFlight = null;   // the AbortController of the latest request
let latest = 0;        // number of the latest request; older answers are ignored

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(generate, DEBOUNCE_MS);
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "dim";
}

async function generate() {
  const prompt = $("prompt").value.trim();
  if (!prompt) { status("type to generate; images update as you type"); return; }
  const seed = Math.max(0, parseInt($("seed").value, 10) || 0);
  const n = parseInt($("n").value, 10);
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  const number = ++latest;
  const started = performance.now();
  try {
    const answer = await fetch("/v1/images/generations", {
      method: "POST", headers: {"Content-Type": "application/json"}, signal: controller.signal,
      body: JSON.stringify({prompt: prompt, n: n, seed: seed}),
    });
    const body = await answer.json();
    if (number !== latest) return;  // superseded while it ran
    if (!answer.ok) {
      const retry = answer.headers.get("Retry-After");
      status(body.error.message + (retry ? " (retry in " + retry + " s)" : ""), true);
      return;
    }
    show(prompt, body, performance.now() - started);
  } catch (e) {
    if (e.name !== "AbortError" && number === latest) status("request failed: " + e.message, true);
  }
}

function show(prompt, body, latencyMs) {
  const images = $("images");
  images.replaceChildren(...body.data.map((item) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + item.b64_json;
    img.alt = prompt + " (seed " + item.seed + ")";
    img.dataset.seed = item.seed;
    const caption = document.createElement("figcaption");
    caption.textContent = "seed " + item.seed;
    figure.append(img, caption);
    return figure;
  }));
  status(latencyMs.toFixed(0) + " ms in the browser, " + body.timings_ms.total.toFixed(1) + " ms in the service"
         + " | " + body.backend + " " + body.precision + " | batch of " + body.batch_images + " image(s)");
  remember(prompt, body.data[0]);
}

function remember(prompt, item) {
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + item.b64_json;
  img.alt = img.title = prompt + " (seed " + item.seed + ")";
  img.addEventListener("click", () => { $("prompt").value = prompt; $("seed").value = item.seed; schedule(); });
  const gallery = $("gallery");
  gallery.prepend(img);
  while (gallery.children.length > GALLERY_SIZE) gallery.lastChild.remove();
}

async function describe() {
  try {
    const info = await (await fetch("/v1/info")).json();
    $("model").textContent = info.family + " · " + info.backend + " " + info.precision + " · "
      + info.replicas + " replica(s)";
  } catch (e) { /* the page still works without it */ }
}

$("prompt").addEventListener("input", schedule);
$("seed").addEventListener("input", schedule);
$("n").addEventListener("change", schedule);
$("random").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e9); schedule(); });
$("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
describe();
