// kdad web page: upload images to POST /predict, show overlays, re-decide from scores when the threshold moves.
// Vanilla JS, no external resources, so it works offline.
"use strict";

const state = { stored: null, threshold: null, cards: [], uploads: 0 };  // cards: {score, element}
const $ = (id) => document.getElementById(id);

function fmt(x) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(6);
}

// Tells apart uploads that share a file name: running number, size and time of the upload.
function uploadLabel(n, bytes, when) {
  const size = bytes < 1024 * 1024 ? `${(bytes / 1024).toFixed(1)} kB` : `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  return `upload #${n} · ${size} · ${when.toLocaleTimeString()}`;
}

// The status after one drop or selection: failures are counted, not only successes.
function statusText(scored, failed) {
  const total = scored + failed;
  if (failed === 0) return `${scored} of ${total} image(s) scored`;
  return `${scored} of ${total} image(s) scored, ${failed} failed (red cards say why)`;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function sliderMax() {
  const scores = state.cards.map((c) => c.score);
  const ref = [state.stored || 0, state.threshold || 0, ...scores];
  return Math.max(1e-6, 2 * (state.stored || 0), 1.2 * Math.max(...ref));
}

function syncSlider() {
  const slider = $("threshold");
  const max = sliderMax();
  slider.max = String(max);
  slider.step = String(max / 2000);
  if (state.threshold !== null) {
    slider.value = String(state.threshold);
    $("threshold-number").value = String(state.threshold);
  }
}

function decide(card) {
  const el = card.element;
  const dec = el.querySelector(".decision");
  el.querySelector(".card-threshold").textContent = fmt(state.threshold);
  const max = sliderMax();
  el.querySelector(".bar-score").style.width = `${Math.min(100, (100 * card.score) / max)}%`;
  const bar = el.querySelector(".bar-threshold");
  bar.style.display = state.threshold === null ? "none" : "block";
  bar.style.left = `${Math.min(100, (100 * (state.threshold || 0)) / max)}%`;
  if (card.invalid) {  // the invalid-input gate: not a picture of the trained product, whatever the threshold
    dec.textContent = `INVALID: ${card.reason}`;
    dec.className = "decision invalid";
    el.dataset.decision = "invalid";
    return;
  }
  if (state.threshold === null) {
    dec.textContent = "no threshold (set one with the slider)";
    dec.className = "decision";
    el.dataset.decision = "";
    return;
  }
  const anomalous = card.score >= state.threshold;
  dec.textContent = anomalous ? "ANOMALOUS" : "normal";
  dec.className = `decision ${anomalous ? "anomalous" : "normal"}`;
  el.dataset.decision = anomalous ? "1" : "0";
}

function setThreshold(value) {
  if (!Number.isFinite(value)) return;
  state.threshold = value;
  syncSlider();
  state.cards.forEach(decide);
}

function addCard(name, label, result) {
  const el = $("card-template").content.firstElementChild.cloneNode(true);
  el.querySelector(".name").textContent = name;
  el.querySelector(".meta").textContent = label;
  if (result.error) {  // a compact full-width strip: name, upload label and the reason, no empty image box
    el.classList.add("failed");
    el.querySelector(".overlay").remove();
    el.querySelectorAll(".facts > :not(.name):not(.meta)").forEach((child) => child.remove());
    const msg = document.createElement("div");
    msg.className = "error";
    msg.textContent = result.error;
    el.querySelector(".facts").appendChild(msg);
    $("results").prepend(el);
    return;
  }
  el.querySelector(".overlay").src = `data:image/png;base64,${result.heatmap_png_base64}`;
  const scoreEl = el.querySelector(".score");
  scoreEl.textContent = fmt(result.score);
  scoreEl.dataset.score = String(result.score);
  el.dataset.score = String(result.score);
  const card = { score: result.score, element: el, invalid: result.label === "invalid", reason: result.reason };
  state.cards.push(card);
  $("results").prepend(el);
  syncSlider();
  state.cards.forEach(decide);
}

async function upload(files) {
  const list = Array.from(files).filter((f) => f.size >= 0);
  let scored = 0;
  let failed = 0;
  for (let i = 0; i < list.length; i++) {
    const file = list[i];
    state.uploads += 1;
    const label = uploadLabel(state.uploads, file.size, new Date());
    setStatus(`scoring ${file.name} (${i + 1}/${list.length})…`, false);
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const response = await fetch("/predict", { method: "POST", body: form });
      const body = await response.json().catch(() => ({ detail: response.statusText }));
      if (!response.ok) {
        addCard(file.name, label, { error: `${response.status}: ${body.detail || response.statusText}` });
        failed += 1;
        continue;
      }
      addCard(file.name, label, body);
      scored += 1;
    } catch (err) {
      addCard(file.name, label, { error: String(err) });
      failed += 1;
    }
  }
  setStatus(statusText(scored, failed), failed > 0);
  loadMonitor();
}

function driftText(drift) {
  if (drift.ks_statistic === null) return `drift: ${drift.reason} (window ${drift.window_images}/${drift.window})`;
  const verdict = drift.alarm ? "DRIFT ALARM: recent scores differ from the calibration normals; recalibrate or " +
    "check the camera (kdad calibrate)" : "no drift alarm";
  return `drift over the last ${drift.window_images} images: KS ${drift.ks_statistic.toFixed(3)}, ` +
    `p = ${drift.ks_pvalue.toPrecision(2)} (alarm below ${drift.alarm_p}) · ${verdict}`;
}

async function loadMonitor() {
  try {
    const data = await (await fetch("/monitor")).json();
    const box = $("score-histogram");
    box.textContent = "";
    const h = data.histogram;
    const top = Math.max(1e-9, ...h.recent, ...h.calibration);
    const span = h.edges.length ? h.edges[h.edges.length - 1] - h.edges[0] : 1;
    for (let i = 0; i + 1 < h.edges.length; i++) {
      for (const kind of ["calibration", "recent"]) {
        const bar = document.createElement("div");
        bar.className = `hbar ${kind}`;
        bar.style.left = `${(100 * (h.edges[i] - h.edges[0])) / span}%`;
        bar.style.width = `${100 / (h.edges.length - 1)}%`;
        bar.style.height = `${(100 * ((h[kind][i] || 0) / top))}%`;
        bar.title = `${kind} ${fmt(h.edges[i])}..${fmt(h.edges[i + 1])}: ${((h[kind][i] || 0) * 100).toFixed(1)}%`;
        box.appendChild(bar);
      }
    }
    if (data.threshold !== null && h.edges.length) {
      const line = document.createElement("div");
      line.className = "hthreshold";
      line.style.left = `${(100 * (data.threshold - h.edges[0])) / span}%`;
      line.title = `image threshold ${fmt(data.threshold)}`;
      box.appendChild(line);
    }
    const drift = $("drift");
    drift.textContent = driftText(data.drift);
    drift.classList.toggle("error", Boolean(data.drift.alarm));
  } catch (err) {
    $("drift").textContent = `cannot load /monitor: ${err}`;
  }
}

async function loadInfo() {
  try {
    const info = await (await fetch("/info")).json();
    state.stored = info.image_threshold;
    state.threshold = info.image_threshold;
    $("stored-threshold").textContent = fmt(info.image_threshold);
    $("model-info").textContent = `${info.method} · ${info.backend} · input ${info.image_size}×${info.image_size} RGB ` +
      `in [0, 1] · pixel threshold ${fmt(info.pixel_threshold)}`;
    syncSlider();
  } catch (err) {
    $("model-info").textContent = `cannot load /info: ${err}`;
  }
}

function wire() {
  const drop = $("drop");
  $("file-input").addEventListener("change", (e) => upload(e.target.files));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => upload(e.dataTransfer.files));
  $("threshold").addEventListener("input", (e) => setThreshold(parseFloat(e.target.value)));
  $("threshold-number").addEventListener("change", (e) => setThreshold(parseFloat(e.target.value)));
  $("threshold-reset").addEventListener("click", () => {
    if (state.stored !== null) setThreshold(state.stored);
  });
}

if (typeof document !== "undefined") {
  wire();
  loadInfo();
  loadMonitor();
}
if (typeof module !== "undefined") module.exports = { statusText, uploadLabel, driftText };  // for the tests (node)
