// duch's search page: the query lives in the address (?q= caption, ?id= archive item, m= modality, label=,
// archive=, page=), so a link is the search and back/forward replay it. An uploaded image stays in this page
// (the address says ?image=NAME): a link to it asks for the file again. No framework, nothing from outside.
"use strict";

const PAGE = 24;
const $ = (id) => document.getElementById(id);
let info = null;
const uploads = new Map(); // image file name -> the File, for back/forward to image queries of this visit
let labelsOf = "";

function params() {
  return new URLSearchParams(location.search);
}

function navigate(next, replace = false) {
  const keep = new URLSearchParams();
  for (const [key, value] of Object.entries(next)) {
    if (value !== null && value !== undefined && value !== "") keep.set(key, value);
  }
  const url = "?" + keep.toString();
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
}

function current() {
  const p = params();
  return {
    q: p.get("q"), id: p.get("id"), image: p.get("image"),
    m: p.get("m") || "image", label: p.get("label") || "", archive: p.get("archive") || "",
    page: Math.max(1, parseInt(p.get("page") || "1", 10) || 1),
  };
}

function withChanges(changes) {
  const s = current();
  const next = { q: s.q, id: s.id, image: s.image, m: s.m, label: s.label, archive: s.archive, page: s.page };
  return Object.assign(next, changes);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function thumb(url, alt) {
  const img = el("img", { src: url, alt: alt, width: 256, height: 256 });
  img.addEventListener("error", () => { // an image file the service cannot read: a tile that says so
    img.replaceWith(el("div", { class: "nothumb" }, "no preview"));
  });
  return img;
}

function showQuery(s) {
  const box = $("query");
  box.replaceChildren();
  if (s.id) {
    box.append(thumb(thumbUrl(s.id, s.archive), s.id), el("strong", {}, "More like " + s.id));
  } else if (s.image) {
    box.append(el("strong", {}, "Images like " + s.image));
  }
}

function thumbUrl(id, archive) {
  const base = "/thumbs/" + encodeURIComponent(id.split("#")[0]);
  return archive ? base + "?archive=" + encodeURIComponent(archive) : base;
}

async function search(s) {
  const fields = { k: PAGE, offset: (s.page - 1) * PAGE, modality: s.m };
  if (s.label) fields.label = s.label;
  if (s.archive) fields.archive = s.archive;
  let body;
  let headers = {};
  if (s.image) {
    body = new FormData();
    for (const [key, value] of Object.entries(fields)) body.set(key, String(value));
    const file = uploads.get(s.image);
    body.set("image", file, file.name);
  } else {
    body = JSON.stringify(Object.assign(fields, s.q ? { text: s.q } : { id: s.id }));
    headers = { "content-type": "application/json" };
  }
  const response = await fetch("/api/search", { method: "POST", body, headers });
  const answer = await response.json().catch(() => ({ error: "the service answered " + response.status }));
  if (!response.ok) throw new Error(answer.error || "the service answered " + response.status);
  return answer;
}

function showHits(answer, s) {
  const list = $("results");
  list.replaceChildren();
  if (!answer.hits.length) {
    list.append(el("li", { class: "empty" }, s.label ? "Nothing of class " + s.label + " here." : "No results."));
  }
  for (const hit of answer.hits) {
    const item = el("li", { class: "hit " + hit.modality, "data-id": hit.id });
    const link = el("a", { href: "?" + new URLSearchParams(Object.entries(
      { id: hit.id, m: s.m, label: s.label, archive: s.archive }).filter(([, v]) => v)).toString(),
    title: "more like this" });
    link.addEventListener("click", (event) => {
      event.preventDefault();
      navigate(withChanges({ id: hit.id, q: null, image: null, page: 1 }));
      window.scrollTo(0, 0);
    });
    const meta = el("div", { class: "meta" });
    meta.append(el("span", { class: "label" }, hit.label || ""), el("span", { class: "d" }, "d " + hit.distance));
    link.append(thumb(hit.thumbnail, hit.label || hit.id), meta);
    if (hit.caption) link.append(el("p", { class: "caption" }, hit.caption));
    item.append(link);
    list.append(item);
  }
  const t = answer.timings;
  const what = answer.modality === "image" ? "images" : "captions";
  const first = answer.offset + (answer.hits.length ? 1 : 0);
  setStatus(`${first}-${answer.offset + answer.hits.length} of ${answer.matched} ${what}` +
    ` · encode ${t.encode_ms.toFixed(1)} ms · scan ${t.scan_ms.toFixed(1)} ms · total ${t.total_ms.toFixed(1)} ms`);
  const depth = Math.min(answer.matched, info ? info.limits.most_depth : answer.matched);
  const pages = Math.max(1, Math.ceil(depth / PAGE));
  $("pager").hidden = pages <= 1;
  $("pageinfo").textContent = `page ${s.page} of ${pages}`;
  $("prev").disabled = s.page <= 1;
  $("next").disabled = s.page >= pages;
}

let ticket = 0; // only the latest search paints the page

function settle(state) { // the page's state for the address it shows: loading, done, empty or error
  document.body.dataset.query = location.search;
  document.body.dataset.state = state;
}

async function render() {
  const s = current();
  settle("loading");
  $("q").value = s.q || "";
  for (const radio of document.querySelectorAll("input[name=modality]")) radio.checked = radio.value === s.m;
  fillLabels(s.archive);
  $("label").value = s.label;
  if (s.archive) $("archive").value = s.archive;
  showQuery(s);
  if (!s.q && !s.id && !s.image) {
    $("results").replaceChildren();
    $("pager").hidden = true;
    setStatus("Type a caption, drop an image, or pick one with \"or an image\".");
    settle("empty");
    return;
  }
  if (s.image && !uploads.has(s.image)) {
    $("results").replaceChildren();
    $("pager").hidden = true;
    setStatus("This link searched by the image " + s.image + ", which stays on the computer it came from: " +
      "drop it here again.", true);
    settle("error");
    return;
  }
  const mine = ++ticket;
  setStatus("Searching…");
  $("results").classList.add("loading");
  try {
    const answer = await search(s);
    if (mine === ticket) {
      showHits(answer, s);
      settle("done");
    }
  } catch (error) {
    if (mine === ticket) {
      $("results").replaceChildren();
      $("pager").hidden = true;
      setStatus("Error: " + error.message, true);
      settle("error");
    }
  } finally {
    if (mine === ticket) $("results").classList.remove("loading");
  }
}

function searchImage(file) {
  if (!file) return;
  uploads.set(file.name, file);
  navigate(withChanges({ image: file.name, q: null, id: null, page: 1 }));
}

function fillLabels(name) {
  if (!info) return;
  const archive = info.archives.find((a) => a.name === (name || info.default)) || info.archives[0];
  if (labelsOf === archive.name) return;
  labelsOf = archive.name;
  $("label").replaceChildren(el("option", { value: "" }, "all classes"));
  for (const label of archive.labels) $("label").append(el("option", { value: label }, label));
}

async function start() {
  try {
    info = await (await fetch("/api/info")).json();
    if (info.archives.length > 1) {
      $("archive").hidden = false;
      for (const a of info.archives) $("archive").append(el("option", { value: a.name }, a.name));
      $("archive").value = current().archive || info.default;
    }
  } catch (error) {
    setStatus("Error: the service did not answer (" + error.message + ")", true);
  }
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("q").value.trim();
    if (!text) return;
    navigate(withChanges({ q: text, id: null, image: null, page: 1 }));
  });
  for (const radio of document.querySelectorAll("input[name=modality]")) {
    radio.addEventListener("change", () => navigate(withChanges({ m: radio.value, page: 1 })));
  }
  $("label").addEventListener("change", () => navigate(withChanges({ label: $("label").value, page: 1 })));
  $("archive").addEventListener("change", () => navigate(withChanges({ archive: $("archive").value, label: "",
    id: null, page: 1 })));
  $("prev").addEventListener("click", () => navigate(withChanges({ page: current().page - 1 })));
  $("next").addEventListener("click", () => navigate(withChanges({ page: current().page + 1 })));
  $("file").addEventListener("change", () => searchImage($("file").files[0]));
  let depth = 0;
  document.addEventListener("dragenter", (event) => { event.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    searchImage(event.dataTransfer.files[0]);
  });
  window.addEventListener("popstate", render);
  render();
}

start();
