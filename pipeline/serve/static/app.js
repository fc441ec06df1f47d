// duch's search page: the query lives in the address (?q= caption, ?id= archive item, m= modality, label=,
// archive=, page=; for scene tiles bbox=, inside=1, from=, to=), so a link is the search and back/forward replay
// it. An uploaded image stays in this page (the address says ?image=NAME): a link to it asks for the file again;
// it is shown above its results from the File itself. Pages never reach past the service's depth limit
// (/api/info's limits.most_depth: offset + k at most that).
// Archives of scene tiles get a map panel (map.js). No framework, nothing from outside.
// Refine with examples: each card has a right / wrong mark; the marks are in the address (pos=, neg=: image ids)
// as they are made, without a new search; "Refine" (refine=1) searches again with them (ex=1: the marked images
// left out), so a link or a reload shows the marks and the refined results. near=LON,LAT,METRES: tiles near a
// point clicked on the map, with whatever query is shown ("like this, near here").
"use strict";

const PAGE = 24;
const KEYS = ["q", "id", "image", "m", "label", "archive", "bbox", "inside", "from", "to", "page", "pos", "neg",
  "refine", "ex", "near"];
const NO_MARKS = { pos: "", neg: "", refine: "", ex: "" }; // a new query starts unmarked
const $ = (id) => document.getElementById(id);
let info = null;
const uploads = new Map(); // image file name -> {file, url}, for back/forward to image queries of this visit
let labelsOf = "";
let map = null;
let mapOf = null; // the archive the map shows

function reach() { // how deep paging goes: offset + k is at most this (the service refuses more)
  return info && info.limits ? info.limits.most_depth : Infinity;
}

function lastPage(matched) { // the last page that can be shown of `matched` hits (1 when there are none)
  return Math.max(1, Math.ceil(Math.min(matched, reach()) / PAGE));
}

function params() {
  return new URLSearchParams(location.search);
}

function urlOf(next) {
  const keep = new URLSearchParams();
  for (const [key, value] of Object.entries(next)) {
    if (value !== null && value !== undefined && value !== "" && value !== false) keep.set(key, value);
  }
  return "?" + keep.toString().replace(/%2C/g, ","); // a box reads as four numbers in the address
}

function navigate(next, replace = false) {
  const url = urlOf(next);
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
}

function current() {
  const p = params();
  return {
    q: p.get("q"), id: p.get("id"), image: p.get("image"),
    m: p.get("m") || "image", label: p.get("label") || "", archive: p.get("archive") || "",
    bbox: p.get("bbox") || "", inside: p.get("inside") === "1" ? "1" : "", from: p.get("from") || "",
    to: p.get("to") || "", page: Math.max(1, parseInt(p.get("page") || "1", 10) || 1),
    pos: p.get("pos") || "", neg: p.get("neg") || "", refine: p.get("refine") === "1" ? "1" : "",
    ex: p.get("ex") === "1" ? "1" : "", near: p.get("near") || "",
  };
}

function withChanges(changes) {
  const s = current();
  return Object.assign(Object.fromEntries(KEYS.map((key) => [key, s[key]])), changes);
}

function archiveInfo(name) {
  if (!info) return null;
  return info.archives.find((a) => a.name === (name || info.default)) || info.archives[0];
}

function boxOf(s) { // the address's box as four numbers, or null
  const v = s.bbox.split(",").map(Number);
  return v.length === 4 && v.every(Number.isFinite) ? v : null;
}

function filters(s) { // what the API takes of the address's filters
  const out = {};
  if (s.label) out.label = s.label;
  if (s.bbox) out.bbox = s.bbox;
  if (s.bbox && s.inside) out.inside = true;
  if (s.from) out.date_from = s.from;
  if (s.to) out.date_to = s.to;
  if (s.archive) out.archive = s.archive;
  if (s.near) out.near = s.near;
  if (refining(s)) {
    if (s.pos) out.positives = s.pos;
    if (s.neg) out.negatives = s.neg;
    if (s.ex) out.exclude_marked = true;
  }
  return out;
}

function ids(list) { return list ? list.split(",").filter(Boolean) : []; }

function refining(s) { return Boolean(s.refine && (s.pos || s.neg)); }

function mark(imageId, kind) { // right ("pos") or wrong ("neg"), again to unmark: the address, not a new search
  const s = current();
  const other = kind === "pos" ? "neg" : "pos";
  const mine = ids(s[kind]);
  const next = { [other]: ids(s[other]).filter((i) => i !== imageId).join(",") };
  next[kind] = (mine.includes(imageId) ? mine.filter((i) => i !== imageId) : mine.concat([imageId])).join(",");
  history.replaceState(null, "", urlOf(withChanges(next)));
  document.body.dataset.query = location.search; // the page still shows this address's results
  showMarks(current());
}

function showMarks(s) { // each card's marks, and the bar that refines with them
  const pos = ids(s.pos);
  const neg = ids(s.neg);
  for (const card of document.querySelectorAll("#results .hit")) {
    const image = card.dataset.image;
    card.classList.toggle("right", pos.includes(image));
    card.classList.toggle("wrong", neg.includes(image));
    card.querySelector(".mark.pos").setAttribute("aria-pressed", String(pos.includes(image)));
    card.querySelector(".mark.neg").setAttribute("aria-pressed", String(neg.includes(image)));
  }
  $("marksbar").hidden = !pos.length && !neg.length;
  $("markinfo").textContent = `${pos.length} right, ${neg.length} wrong marked` +
    (refining(s) ? " · these results are refined with them" : "");
  $("hidemarked").checked = Boolean(s.ex);
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
    const upload = uploads.get(s.image); // made in this browser from the file itself: nothing is sent for it
    if (upload) box.append(thumb(upload.url, s.image));
    box.append(el("strong", {}, "Images like " + s.image));
  } else if (refining(s) && !s.q) {
    box.append(el("strong", {}, "Images like the ones marked right"));
  }
  if (refining(s)) {
    box.append(el("span", { class: "refined" }, `refined with ${ids(s.pos).length} right and ` +
      `${ids(s.neg).length} wrong`));
  }
}

function thumbUrl(id, archive) {
  const base = "/thumbs/" + encodeURIComponent(id.split("#")[0]);
  return archive ? base + "?archive=" + encodeURIComponent(archive) : base;
}

async function search(s) {
  const offset = (s.page - 1) * PAGE; // the last page may be short: offset + k stays within reach()
  const fields = Object.assign({ k: Math.min(PAGE, reach() - offset), offset, modality: s.m }, filters(s));
  let body;
  let headers = {};
  if (s.image) {
    body = new FormData();
    for (const [key, value] of Object.entries(fields)) body.set(key, String(value));
    const file = uploads.get(s.image).file;
    body.set("image", file, file.name);
  } else {
    body = JSON.stringify(Object.assign(fields, s.q ? { text: s.q } : s.id ? { id: s.id } : {}));
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
    const filtered = s.label || s.bbox || s.from || s.to;
    list.append(el("li", { class: "empty" }, filtered ? "Nothing here matches the filters." : "No results."));
  }
  for (const hit of answer.hits) {
    const item = el("li", { class: "hit " + hit.modality, "data-id": hit.id, "data-image": hit.image_id });
    const more = withChanges(Object.assign({ id: hit.id, q: null, image: null, page: 1 }, NO_MARKS));
    const link = el("a", { href: "?" + new URLSearchParams(Object.entries(more).filter(([, v]) => v)).toString(),
      title: "more like this" });
    link.addEventListener("click", (event) => {
      event.preventDefault();
      navigate(more);
      window.scrollTo(0, 0);
    });
    const meta = el("div", { class: "meta" });
    const name = hit.place ? hit.id : hit.label || ""; // a scene tile: where it is, instead of a class
    meta.append(el("span", { class: "label" }, name), el("span", { class: "d" }, "d " + hit.distance));
    link.append(thumb(hit.thumbnail, hit.label || hit.id), meta);
    if (hit.place) link.append(el("p", { class: "caption" }, hit.place.date || "no date"));
    if (hit.place && hit.place.stac) link.append(stacLine(hit.place.stac));
    if (hit.caption) link.append(el("p", { class: "caption" }, hit.caption));
    item.addEventListener("pointerenter", () => lightUp(hit.id));
    item.addEventListener("pointerleave", () => lightUp(null));
    item.append(link);
    const marks = el("div", { class: "marks" });
    for (const [kind, sign, title] of [["pos", "\u2713", "right: more like this"], ["neg", "\u2717", "wrong"]]) {
      const button = el("button", { type: "button", class: "mark " + kind, title, "aria-pressed": "false" }, sign);
      button.addEventListener("click", () => mark(hit.image_id, kind));
      marks.append(button);
    }
    item.append(marks);
    list.append(item);
  }
  showMarks(s);
  if (map) map.set("hits", answer.hits);
  const t = answer.timings;
  const tiles = archiveInfo(s.archive) && archiveInfo(s.archive).places;
  const what = answer.modality === "text" ? "captions" : tiles ? "tiles" : "images";
  const first = answer.offset + (answer.hits.length ? 1 : 0);
  setStatus(`${first}-${answer.offset + answer.hits.length} of ${answer.matched} ${what}` +
    ` · encode ${t.encode_ms.toFixed(1)} ms · scan ${t.scan_ms.toFixed(1)} ms · total ${t.total_ms.toFixed(1)} ms`);
  const pages = lastPage(answer.matched);
  const beyond = answer.matched - Math.min(answer.matched, reach());
  $("pager").hidden = pages <= 1 && s.page <= 1;
  $("pageinfo").textContent = `page ${s.page} of ${pages}`;
  $("beyond").textContent = `${beyond} more ${what} lie past the first ${reach()}: narrow the search to reach them`;
  $("beyond").hidden = beyond <= 0;
  $("prev").disabled = s.page <= 1;
  $("next").disabled = s.page >= pages;
}

let ticket = 0; // only the latest search paints the page

function lightUp(id) { // a hit's card and footprint, together
  for (const card of document.querySelectorAll("#results .hit")) card.classList.toggle("on", card.dataset.id === id);
  if (map) map.highlight(id);
}

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
  showMap(s);
  if (map) map.set("hits", []);
  showMarks(s);
  if (!s.q && !s.id && !s.image && !refining(s)) {
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
  if (s.page > lastPage(Infinity)) { // a typed or old address past the depth limit: its last page instead
    navigate(withChanges({ page: lastPage(Infinity) }), true);
    return;
  }
  const mine = ++ticket;
  setStatus("Searching…");
  $("results").classList.add("loading");
  try {
    const answer = await search(s);
    if (mine === ticket && !answer.hits.length && s.page > lastPage(answer.matched)) {
      navigate(withChanges({ page: lastPage(answer.matched) }), true); // past the last page: the last one
    } else if (mine === ticket) {
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
  const earlier = uploads.get(file.name);
  if (earlier) URL.revokeObjectURL(earlier.url); // a new file of the same name replaces the old one
  uploads.set(file.name, { file, url: URL.createObjectURL(file) });
  navigate(withChanges(Object.assign({ image: file.name, q: null, id: null, page: 1 }, NO_MARKS)));
}

function fillLabels(name) {
  const archive = archiveInfo(name);
  if (!archive || labelsOf === archive.name) return;
  labelsOf = archive.name;
  $("label").replaceChildren(el("option", { value: "" }, "all classes"));
  for (const label of archive.labels) $("label").append(el("option", { value: label }, label));
  $("label").hidden = !archive.labels.length; // scene tiles have no classes
  $("modality").hidden = !archive.modalities.includes("text");
}

function stacLine(stac) { // a STAC item's tile: collection, platform, cloud cover; the item's properties as its title
  const p = stac.properties || {};
  const cloud = typeof p["eo:cloud_cover"] === "number" ? "cloud " + p["eo:cloud_cover"] + "%" : null;
  const shown = [stac.collection, p.platform, cloud].filter((v) => v);
  return el("p", { class: "caption stac", title: JSON.stringify({ item: stac.id, ...p }, null, 1) },
    shown.length ? shown.join(" · ") : stac.id);
}

function showMap(s) { // the map panel of an archive of scene tiles: its extent and scenes, the box, the dates
  const archive = archiveInfo(s.archive);
  const places = Boolean(archive && archive.places);
  $("mappanel").hidden = !places;
  document.body.classList.toggle("withmap", places);
  if (!places) return;
  if (!map) {
    map = new window.DuchMap($("map"), {
      onBox: (box) => navigate(withChanges({ bbox: box.join(","), page: 1 })),
      onPick: (id) => {
        const card = document.querySelector(`#results .hit[data-id="${CSS.escape(id)}"]`);
        if (card) card.scrollIntoView({ block: "nearest" });
        lightUp(id);
      },
      onHover: lightUp,
      onPoint: (lon, lat) => navigate(withChanges({ near: `${lon},${lat},${radius()}`, page: 1 })),
    });
    window.duchMap = map;
    if (info.basemap) {
      map.basemap = info.basemap.url;
      $("attribution").textContent = info.basemap.attribution;
      $("attribution").hidden = !info.basemap.attribution;
    }
  }
  const box = boxOf(s);
  map.set("box", box);
  if (mapOf !== archive.name) { // another archive: its extent and scenes, and the view fitted to them
    mapOf = archive.name;
    map.set("scenes", []);
    map.set("extent", archive.extent);
    map.fit(box || archive.extent);
    fetch("/api/scenes?archive=" + encodeURIComponent(archive.name)).then((r) => r.json())
      .then((doc) => { if (mapOf === archive.name) map.set("scenes", doc.features); })
      .catch(() => {}); // outlines are a backdrop: the map works without them
  }
  $("inside").checked = Boolean(s.inside);
  $("inside").disabled = !box;
  $("from").value = s.from;
  $("to").value = s.to;
  $("clearbox").disabled = !box;
  const near = s.near.split(",").map(Number);
  map.set("near", near.length === 3 && near.every(Number.isFinite) ? near : null);
  if (map.near) $("radius").value = String(map.near[2]);
  $("nearinfo").textContent = map.near ? `near ${map.near[0].toFixed(5)}, ${map.near[1].toFixed(5)} within ` +
    `${map.near[2]} m` : "Click a point: tiles near it.";
  $("clearnear").hidden = !map.near;
  $("boxinfo").textContent = box ? "box " + box.map((v) => v.toFixed(5)).join(", ") :
    "Drag on the map to search a box (shift-drag pans).";
  const query = s.q ? { text: s.q } : s.id ? { id: s.id } : null;
  $("geojson").hidden = !query;
  if (query) {
    const offset = (s.page - 1) * PAGE;
    const fields = Object.assign(query, { k: Math.min(PAGE, reach() - offset), offset }, filters(s));
    $("geojson").href = "/api/search.geojson?" + new URLSearchParams(fields).toString();
  }
}

function radius() { // the near radius typed in the map's bar, in metres
  const value = Number($("radius").value);
  return Number.isFinite(value) && value >= 0 ? value : 1000;
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
    navigate(withChanges(Object.assign({ q: text, id: null, image: null, page: 1 }, NO_MARKS)));
  });
  for (const radio of document.querySelectorAll("input[name=modality]")) {
    radio.addEventListener("change", () => navigate(withChanges({ m: radio.value, page: 1 })));
  }
  $("label").addEventListener("change", () => navigate(withChanges({ label: $("label").value, page: 1 })));
  $("archive").addEventListener("change", () => navigate(withChanges({ archive: $("archive").value, label: "",
    id: null, bbox: "", inside: "", from: "", to: "", page: 1, near: "", ...NO_MARKS })));
  $("prev").addEventListener("click", () => navigate(withChanges({ page: current().page - 1 })));
  $("next").addEventListener("click", () => navigate(withChanges({ page: current().page + 1 })));
  $("file").addEventListener("change", () => searchImage($("file").files[0]));
  $("inside").addEventListener("change", () => navigate(withChanges({ inside: $("inside").checked ? "1" : "",
    page: 1 })));
  $("from").addEventListener("change", () => navigate(withChanges({ from: $("from").value, page: 1 })));
  $("to").addEventListener("change", () => navigate(withChanges({ to: $("to").value, page: 1 })));
  $("clearbox").addEventListener("click", () => navigate(withChanges({ bbox: "", inside: "", page: 1 })));
  $("clearnear").addEventListener("click", () => navigate(withChanges({ near: "", page: 1 })));
  $("radius").addEventListener("change", () => {
    const near = current().near.split(",");
    if (near.length === 3) navigate(withChanges({ near: `${near[0]},${near[1]},${radius()}`, page: 1 }));
  });
  $("refine").addEventListener("click", () => navigate(withChanges({ refine: "1", page: 1 })));
  $("hidemarked").addEventListener("change", () => navigate(withChanges({ ex: $("hidemarked").checked ? "1" : "",
    page: 1 })));
  $("clearmarks").addEventListener("click", () => navigate(withChanges(Object.assign({ page: 1 }, NO_MARKS))));
  const centre = () => { const r = $("map").getBoundingClientRect(); return [r.width / 2, r.height / 2]; };
  $("zoomin").addEventListener("click", () => map.zoom(2, ...centre()));
  $("zoomout").addEventListener("click", () => map.zoom(0.5, ...centre()));
  $("fit").addEventListener("click", () => {
    const s = current();
    map.fit(boxOf(s) || map.hitBounds() || archiveInfo(s.archive).extent);
  });
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
