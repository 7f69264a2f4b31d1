// The search page: an image (dropped, picked or pasted) or words are sent to /api/search; an
// answer clicked asks /api/similar/<i> ("more like this"). The answers come back ranked; each is
// shown as a thumbnail from /api/gallery/<i>?size=<px>, framed green (same class as the query),
// red (another class) or grey (the query's class is unknown, e.g. an upload). A service started
// with an API key answers 401 until the page has it: the page asks once, keeps it for the tab's
// session (sessionStorage) and sends it as a cookie, which thumbnails (<img>) send too.
"use strict";

const THUMBNAIL = 240; // px asked of the server; the grid scales it down
const KEY_COOKIE = "tfcbir_key";
const $ = (id) => document.getElementById(id);
let info = null;
let busy = 0; // the number of the latest search: older answers arriving late are dropped

async function start() {
  rememberKey(sessionStorage.getItem(KEY_COOKIE));
  const response = await fetch("/api/info");
  if (response.status === 401) return askForKey(false);
  info = await response.json();
  if (!response.ok) throw new Error(info.error || `HTTP ${response.status}`);
  $("key-form").hidden = true;
  $("about").textContent =
    `run ${info.run} · gallery ${info.gallery}: ${info.gallery_size} images, ` +
    `${info.classes} classes`;
  $("k").value = info.default_k;
  $("text-form").hidden = !info.has_text;
  wireDrop();
  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("text").value.trim();
    if (text) searchText(text);
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
}

function askForKey(wrong) {
  $("key-form").hidden = false;
  $("about").textContent = "this service needs its API key";
  setStatus(
    wrong
      ? "That key was not accepted: type the service's API key again."
      : "Type the service's API key (ask whoever runs it) to search.",
    wrong
  );
  $("key").focus();
}

function rememberKey(key) {
  if (!key) return;
  sessionStorage.setItem(KEY_COOKIE, key);
  document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; path=/; SameSite=Strict`;
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  rememberKey(key);
  const response = await fetch("/api/info");
  if (response.status === 401) return askForKey(true);
  // A query that is not an image the browser can show (the server says why): no broken icon.
$("query-image").addEventListener("error", () => {
  $("query-image").hidden = true;
});

start().catch((error) => setStatus(`cannot reach the server: ${error.message}`, true));
});

function wireDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    if ($("file").files.length) searchImage($("file").files[0]);
    $("file").value = ""; // the same file picked again searches again
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) searchImage(file);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file").click();
  });
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) searchImage(file);
  });
}

// The number of answers typed, or null (and the reason shown) when it is not one the gallery
// can give: a whole number from 1 to its size (less one for "more like this": the item itself
// is left out).
function k(leaveOneOut = false) {
  const most = info.gallery_size - (leaveOneOut ? 1 : 0);
  const typed = $("k").value.trim();
  const value = /^[0-9]+$/.test(typed) ? parseInt(typed, 10) : NaN;
  if (value >= 1 && value <= most) return value;
  showError(`"answers" must be a whole number from 1 to ${most}, not "${typed}"`);
  $("k").focus();
  return null;
}

// The query string of a search: the number of answers and, when typed, the filter.
function params(answers) {
  const where = $("where").value.trim();
  return `k=${answers}` + (where ? `&where=${encodeURIComponent(where)}` : "");
}

async function searchImage(file) {
  const answers = k();
  if (answers === null) return;
  showQuery({ image: URL.createObjectURL(file), name: file.name, cls: null });
  const form = new FormData();
  form.append("image", file, file.name);
  await ask(`/api/search?${params(answers)}`, { method: "POST", body: form });
}

async function searchText(text) {
  const answers = k();
  if (answers === null) return;
  showQuery({ text, name: "text query", cls: null });
  const form = new FormData();
  form.append("text", text);
  await ask(`/api/search?${params(answers)}`, { method: "POST", body: form });
}

function fromHash() {
  const match = /^#item=(\d+)(?:&k=(\d+))?$/.exec(location.hash);
  if (!match) return;
  if (match[2]) $("k").value = match[2];
  searchSimilar(parseInt(match[1], 10));
}

async function searchSimilar(index) {
  const answers = k(true);
  if (answers === null) return;
  showQuery({ image: thumbnail(index), name: `gallery item ${index}`, cls: null });
  const data = await ask(`/api/similar/${index}?${params(answers)}`);
  if (data) showQuery({ image: thumbnail(index), name: data.query, cls: data.query_class });
}

async function ask(url, options) {
  const mine = ++busy;
  setStatus("searching…");
  const started = performance.now();
  let data;
  try {
    const response = await fetch(url, options);
    if (response.status === 401) {
      if (mine === busy) clearResults();
      askForKey(true);
      return null;
    }
    data = await response.json();
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  } catch (error) {
    if (mine === busy) showError(error.message);
    return null;
  }
  if (mine !== busy) return null;
  const ms = Math.round(performance.now() - started);
  const known = data.results.filter((r) => r.match !== null);
  const matches = known.filter((r) => r.match).length;
  const unknown = data.unknown_words || [];
  setStatus(
    `top ${data.results.length} of ${info.gallery_size} in ${ms} ms` +
      (known.length ? ` · ${matches} of ${known.length} of class ${data.query_class}` : "") +
      (unknown.length ? ` · not in the text tower's vocabulary: ${unknown.join(", ")}` : "")
  );
  $("legend").hidden = !known.length;
  render(data.results);
  return data;
}

function render(results) {
  const list = $("results");
  list.replaceChildren(
    ...results.map((r) => {
      const item = document.createElement("li");
      item.className = "result " + (r.match === null ? "unknown" : r.match ? "match" : "miss");
      item.tabIndex = 0;
      item.dataset.index = r.index;
      item.title = `${r.path}\nclick: more like this`;
      const image = document.createElement("img");
      image.src = thumbnail(r.index);
      image.alt = `${r.class} (${r.path})`;
      image.loading = "lazy";
      const rank = element("span", "rank", `#${r.rank}`);
      const cls = element("div", "class", r.class);
      const score = element("div", "score", `score ${r.score.toFixed(4)}`);
      item.append(image, rank, cls, score);
      const open = () => {
        const answers = k(true);
        if (answers === null) return;
        const hash = `#item=${r.index}&k=${answers}`;
        if (location.hash === hash) fromHash(); // no hashchange event: search again
        else location.hash = hash;
      };
      item.addEventListener("click", open);
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter") open();
      });
      return item;
    })
  );
}

// An error replaces what was shown: no answers of an earlier query stay under it.
function showError(message) {
  clearResults();
  setStatus(message, true);
}

function clearResults() {
  $("results").replaceChildren();
  $("legend").hidden = true;
}

function showQuery({ image, text, name, cls }) {
  $("query").hidden = false;
  $("query-image").hidden = !image;
  if (image) $("query-image").src = image;
  $("query-text").hidden = !text;
  $("query-text").textContent = text ? `“${text}”` : "";
  $("query-name").textContent = name;
  $("query-class").textContent = cls ? `class ${cls}` : "class unknown";
}

function thumbnail(index) {
  return `/api/gallery/${index}?size=${THUMBNAIL}`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text;
  return node;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// A query that is not an image the browser can show (the server says why): no broken icon.
$("query-image").addEventListener("error", () => {
  $("query-image").hidden = true;
});

start().catch((error) => setStatus(`cannot reach the server: ${error.message}`, true));
