// The search page: a photo (chosen, dropped or pasted) or a stored item ("more like this") as
// the query, the top-k as thumbnail cards, a label filter and a k selector.
//
// API used (all relative to the page, so it works behind a path prefix):
//   POST search                    images=<file> | id=<stored id>, k, label (repeated)
//   GET  index/labels              {"labels": {label: count}}
//   GET  index/items/{id}/thumbnail   JPEG (fetched with the key, shown as a blob: URL)
//   GET  info                      the index's size and model, for the header

import { ApiError, call, setKey, setKeyPrompt } from "./api.js";

const $ = (id) => document.getElementById(id);
const els = {
  file: $("file"),
  drop: $("drop"),
  queryImage: $("query-image"),
  queryInfo: $("query-info"),
  k: $("k"),
  labels: $("labels"),
  labelList: $("label-list"),
  clearLabels: $("clear-labels"),
  status: $("status"),
  error: $("error"),
  results: $("results"),
  resultsTitle: $("results-title"),
  indexInfo: $("index-info"),
  keyButton: $("key-button"),
  keyDialog: $("key-dialog"),
  keyInput: $("key-input"),
  keyProblem: $("key-problem"),
};

const state = {
  query: null, // {file} | {id, path, label}
  queryUrl: null, // the blob: URL shown as the query
  cardUrls: [], // the blob: URLs of the result cards (revoked on the next render)
  controller: null, // aborts the search in flight when a new one starts
};

// -- the API key ---------------------------------------------------------------------------------

function askForKey(problem) {
  return new Promise((resolve) => {
    els.keyProblem.textContent = problem || "";
    els.keyProblem.hidden = !problem;
    els.keyInput.value = "";
    const done = () => {
      els.keyDialog.removeEventListener("close", done);
      const key = els.keyDialog.returnValue === "ok" ? els.keyInput.value.trim() : "";
      els.keyInput.value = "";
      resolve(key || null);
    };
    els.keyDialog.addEventListener("close", done);
    els.keyDialog.returnValue = "";
    if (!els.keyDialog.open) els.keyDialog.showModal();
    els.keyInput.focus();
  });
}

setKeyPrompt(askForKey);

els.keyButton.addEventListener("click", async () => {
  const key = await askForKey("");
  if (key) {
    setKey(key);
    loadIndex();
    if (state.query) search();
  }
});

// -- messages ------------------------------------------------------------------------------------

function showError(e) {
  if (e?.name === "AbortError") return;
  const status = e instanceof ApiError && e.status ? `${e.status}: ` : "";
  els.error.textContent = `${status}${e?.message ?? e}`;
  els.error.hidden = false;
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

function setStatus(text) {
  els.status.textContent = text;
}

// -- the index: size and labels ------------------------------------------------------------------

async function loadIndex() {
  try {
    const info = await call("info");
    limitK(info.limits?.max_k);
    if (info.index) {
      const n = info.index.size;
      els.indexInfo.textContent = `${n.toLocaleString()} image${n === 1 ? "" : "s"} · ${info.index.served_model ?? info.model?.name ?? ""}`;
    } else {
      els.indexInfo.textContent = "no index configured";
    }
  } catch (e) {
    showError(e);
    return;
  }
  try {
    const { labels } = await call("index/labels");
    renderLabels(labels);
  } catch (e) {
    showError(e);
  }
}

/** Drop the k choices over the server's max_k (EMBEDSERVE_MAX_K). */
function limitK(maxK) {
  if (!maxK) return;
  for (const option of [...els.k.options]) if (Number(option.value) > maxK) option.remove();
  if (!els.k.options.length) els.k.add(new Option(String(maxK)));
  if (!els.k.value) els.k.selectedIndex = els.k.options.length - 1;
}

function selectedLabels() {
  return [...els.labelList.querySelectorAll("input:checked")].map((box) => box.value);
}

function renderLabels(labels) {
  const chosen = new Set(selectedLabels());
  const names = Object.keys(labels).sort((a, b) => a.localeCompare(b));
  els.labelList.replaceChildren();
  if (!names.length) {
    const none = document.createElement("span");
    none.className = "muted";
    none.textContent = "no labels in the index";
    els.labelList.append(none);
  }
  for (const name of names) {
    const label = document.createElement("label");
    label.className = "chip";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = name;
    box.checked = chosen.has(name);
    box.dataset.label = name;
    const text = document.createElement("span");
    text.textContent = name;
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = labels[name].toLocaleString();
    count.setAttribute("aria-label", `${labels[name]} images`);
    label.append(box, text, count);
    els.labelList.append(label);
  }
  els.labels.disabled = names.length === 0;
  updateClear();
}

function updateClear() {
  els.clearLabels.hidden = selectedLabels().length === 0;
}

els.labelList.addEventListener("change", () => {
  updateClear();
  if (state.query) search();
});

els.clearLabels.addEventListener("click", () => {
  for (const box of els.labelList.querySelectorAll("input:checked")) box.checked = false;
  updateClear();
  if (state.query) search();
});

els.k.addEventListener("change", () => {
  if (state.query) search();
});

// -- the query: a file (chosen, dropped, pasted) or a stored item ---------------------------------

function setQueryImage(url, alt) {
  if (state.queryUrl && state.queryUrl !== url) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = url;
  els.queryImage.hidden = !url;
  if (url) {
    els.queryImage.src = url;
    els.queryImage.alt = alt;
  } else {
    els.queryImage.removeAttribute("src");
  }
}

function queryFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name} is not an image (${file.type})`);
    return;
  }
  state.query = { file };
  setQueryImage(URL.createObjectURL(file), `The query: ${file.name || "a pasted image"}`);
  els.queryInfo.textContent = file.name ? `Query: ${file.name}` : "Query: pasted image";
  els.queryInfo.title = "";
  search();
}

els.file.addEventListener("change", () => {
  queryFile(els.file.files[0]);
});

function firstImage(dataTransfer) {
  return [...(dataTransfer?.files ?? [])].find((f) => !f.type || f.type.startsWith("image/"));
}

// a drop anywhere on the page; the drop area shows that it will take it
for (const type of ["dragenter", "dragover"]) {
  document.addEventListener(type, (event) => {
    if (![...(event.dataTransfer?.types ?? [])].includes("Files")) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    els.drop.classList.add("dragging");
  });
}
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) els.drop.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  els.drop.classList.remove("dragging");
  const file = firstImage(event.dataTransfer);
  if (file) queryFile(file);
  else if (event.dataTransfer?.files?.length) showError("the dropped file is not an image");
});

document.addEventListener("paste", (event) => {
  const file = firstImage(event.clipboardData);
  if (file) {
    event.preventDefault();
    queryFile(file);
  }
});

// -- search and results --------------------------------------------------------------------------

async function search() {
  const query = state.query;
  const form = new FormData();
  if (query.file) form.append("images", query.file, query.file.name || "pasted.png");
  else form.append("id", String(query.id));
  form.append("k", els.k.value);
  const labels = selectedLabels();
  for (const label of labels) form.append("label", label);

  state.controller?.abort();
  const controller = (state.controller = new AbortController());
  clearError();
  setStatus("Searching…");
  els.results.setAttribute("aria-busy", "true");
  try {
    const body = await call("search", { method: "POST", body: form, signal: controller.signal });
    if (controller.signal.aborted) return;
    const hits = body.results?.[0]?.neighbours ?? [];
    renderResults(hits);
    const what = query.file ? "the photo" : `#${query.id}`;
    const within = labels.length ? ` with label ${labels.join(" or ")}` : "";
    setStatus(
      hits.length
        ? `${hits.length} image${hits.length === 1 ? "" : "s"} like ${what}${within}. Choose one for more like it.`
        : `Nothing found like ${what}${within}.`,
    );
  } catch (e) {
    if (controller.signal.aborted) return;
    setStatus("");
    renderResults([]); // the old results are not this query's
    showError(e);
  } finally {
    if (state.controller === controller) els.results.removeAttribute("aria-busy");
  }
}

function renderResults(hits) {
  for (const url of state.cardUrls) if (url !== state.queryUrl) URL.revokeObjectURL(url);
  state.cardUrls = [];
  const cards = hits.map((hit, rank) => card(hit, rank));
  els.results.replaceChildren(...cards);
}

function card(hit, rank) {
  const li = document.createElement("li");
  li.className = "result";
  li.dataset.id = hit.id;
  li.dataset.label = hit.label ?? "";
  li.dataset.path = hit.path ?? "";

  const button = document.createElement("button");
  button.type = "button";
  button.className = "hit";
  button.title = "More like this";
  button.setAttribute(
    "aria-label",
    `More like this: ${hit.path ?? `item ${hit.id}`}, ${hit.label ?? "no label"}, score ${hit.score.toFixed(3)}`,
  );

  const frame = document.createElement("span");
  frame.className = "thumb";
  const img = document.createElement("img");
  img.width = 160;
  img.height = 160;
  img.alt = hit.path ? `Result ${rank + 1}: ${hit.path}` : `Result ${rank + 1}: item ${hit.id}`;
  img.decoding = "async";
  frame.append(img);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  score.title = "cosine similarity";
  frame.append(score);

  const meta = document.createElement("span");
  meta.className = "meta";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = hit.label ?? "no label";
  if (hit.label == null) label.classList.add("none");
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = hit.path ? shortPath(hit.path) : `#${hit.id}`;
  path.title = hit.path ?? "";
  meta.append(label, path);

  button.append(frame, meta);
  button.addEventListener("click", () => moreLike(hit, img));
  li.append(button);

  loadThumbnail(hit.id, img, frame);
  return li;
}

/** A long path's last folder and file name: /home/me/photos/cats/042.jpg -> …/cats/042.jpg */
function shortPath(path) {
  const parts = path.split(/[\\/]/).filter(Boolean);
  return path.length > 24 && parts.length > 2 ? `…/${parts.slice(-2).join("/")}` : path;
}

async function loadThumbnail(id, img, frame) {
  try {
    const blob = await call(`index/items/${encodeURIComponent(id)}/thumbnail`, { as: "blob" });
    const url = URL.createObjectURL(blob);
    state.cardUrls.push(url);
    img.src = url;
  } catch (e) {
    frame.classList.add("missing");
    img.alt = `${img.alt} (no thumbnail${e instanceof ApiError && e.status !== 404 ? `: ${e.message}` : ""})`;
  }
}

function moreLike(hit, img) {
  state.query = { id: hit.id, path: hit.path, label: hit.label };
  // the card's thumbnail becomes the query's picture: keep its URL alive
  setQueryImage(img.currentSrc || null, `The query: ${hit.path ?? `item ${hit.id}`}`);
  els.queryInfo.textContent = `More like #${hit.id}${hit.path ? ` · ${shortPath(hit.path)}` : ""}`;
  els.queryInfo.title = hit.path ?? "";
  els.file.value = "";
  window.scrollTo({ top: 0, behavior: "smooth" });
  els.resultsTitle.focus({ preventScroll: true });
  search();
}

loadIndex();
