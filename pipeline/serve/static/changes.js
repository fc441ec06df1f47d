// duch's change layer on the map panel (archives of scene tiles acquired on two dates or more): the pairs of tiles
// of two dates that GET /api/changes ranks most changed first, drawn on the map (the first date's footprints,
// numbered by rank; the second date's dashed where it lies on another grid), listed below it, and for a selected
// pair both thumbnails side by side. The address keeps it (cfrom=, cto=, pair=RANK, beside the search's own keys;
// the search's box filters the pairs too), so a link shows the same pairs; "hide" leaves the layer.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SHOWN = 24; // pairs drawn and listed
  const KEYS = ["cfrom", "cto", "pair"];
  const $ = (id) => document.getElementById(id);
  let map = null;
  let layer = null;
  let pairs = [];
  let selected = null; // rank of the pair shown side by side
  let archiveName = null; // whose dates the selects list
  let ticket = 0;
  let own = false; // this file is changing the address itself

  function svg(tag, attrs = {}, text = null) {
    const n = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) n.setAttribute(key, value);
    if (text !== null) n.textContent = text;
    return n;
  }

  function el(tag, attrs = {}, text = null) {
    const n = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) n.setAttribute(key, value);
    if (text !== null) n.textContent = text;
    return n;
  }

  function address() {
    const p = new URLSearchParams(location.search);
    return { from: p.get("cfrom") || "", to: p.get("cto") || "", pair: parseInt(p.get("pair") || "0", 10) || 0,
      bbox: p.get("bbox") || "", inside: p.get("inside") === "1", archive: p.get("archive") || "" };
  }

  function setAddress(changes, push = true) { // the change keys set, the search's own kept
    own = true;
    const p = new URLSearchParams(location.search);
    for (const [key, value] of Object.entries(changes)) {
      if (value) p.set(key, value);
      else p.delete(key);
    }
    const url = "?" + p.toString().replace(/%2C/g, ",");
    try {
      if (push) history.pushState(null, "", url);
      else history.replaceState(null, "", url);
    } finally {
      own = false;
    }
  }

  function draw() { // on the map's own redraws too (pan, zoom): the layer follows the view
    if (!map || !layer) return;
    const ring = (corners) => corners.map(([lon, lat]) => map.project(lon, lat).map((v) => v.toFixed(1)).join(","))
      .join(" ");
    const shapes = [];
    const labels = [];
    for (const p of pairs) {
      const before = p.from.place;
      const after = p.to.place;
      if (!before || !before.lonlat) continue;
      if (after && after.lonlat && p.iou < 0.999) {
        shapes.push(svg("polygon", { class: "change other", points: ring(after.lonlat) }));
      }
      const poly = svg("polygon", { class: "change", points: ring(before.lonlat), "data-pair": p.rank });
      poly.classList.toggle("on", p.rank === selected);
      poly.append(svg("title", {}, `${p.rank}. ${p.from.id} → ${p.to.id} · d ${p.distance}`));
      shapes.push(poly);
      const px = before.lonlat.map(([lon, lat]) => map.project(lon, lat));
      const cx = px.reduce((s, q) => s + q[0], 0) / px.length;
      const cy = px.reduce((s, q) => s + q[1], 0) / px.length;
      const span = Math.max(...px.map((q) => q[0])) - Math.min(...px.map((q) => q[0]));
      labels.push(span >= 16 ? svg("text", { class: "changerank", x: cx, y: cy }, String(p.rank))
        : svg("circle", { class: "changemarker", cx, cy, r: 4, "data-pair": p.rank }));
    }
    layer.replaceChildren(...shapes, ...labels);
  }

  function attach(found) { // the map made by app.js: a layer of our own above its hits, redrawn with it
    if (map === found) return;
    map = found;
    layer = svg("g", { class: "changes" });
    map.el.insertBefore(layer, map.layers.box);
    const redraw = map.draw.bind(map);
    map.draw = () => { redraw(); draw(); };
    let down = null; // a click on a pair (a press and release without a drag) selects it
    map.el.addEventListener("pointerdown", (e) => {
      const target = e.target.closest("[data-pair]");
      down = target ? { rank: Number(target.dataset.pair), x: e.clientX, y: e.clientY } : null;
    }, true);
    map.el.addEventListener("pointerup", (e) => {
      if (down && Math.abs(e.clientX - down.x) < 5 && Math.abs(e.clientY - down.y) < 5) select(down.rank);
      down = null;
    });
    draw();
  }

  function thumbFigure(tile, date) {
    const figure = el("figure");
    const img = el("img", { src: tile.thumbnail, alt: tile.id, width: 256, height: 256 });
    figure.append(img, el("figcaption", {}, `${date} · ${tile.id}`));
    return figure;
  }

  function showPair() {
    const view = $("pairview");
    const p = pairs.find((x) => x.rank === selected);
    view.hidden = !p;
    for (const item of document.querySelectorAll("#pairs li")) {
      item.classList.toggle("on", Number(item.dataset.pair) === selected);
    }
    if (!p) return;
    const s = address();
    view.replaceChildren(thumbFigure(p.from, s.from), thumbFigure(p.to, s.to),
      el("p", { class: "pairinfo" }, `${p.rank}. Hamming distance ${p.distance}` +
        (p.score === null ? "" : ` · cosine ${p.score.toFixed(3)}`) + (p.iou < 0.999 ? ` · IoU ${p.iou.toFixed(2)}` : "")));
    draw();
  }

  function select(rank) {
    selected = rank;
    setAddress({ pair: rank }, false);
    showPair();
  }

  function listPairs(answer) {
    const list = $("pairs");
    list.replaceChildren();
    for (const p of answer.pairs) {
      const item = el("li", { "data-pair": p.rank });
      const button = el("button", { type: "button", class: "pairbutton" },
        `${p.rank}. d ${p.distance}  ${p.from.id} → ${p.to.id}`);
      button.addEventListener("click", () => select(p.rank));
      item.append(button);
      list.append(item);
    }
    const unpaired = answer.unpaired;
    $("chstatus").textContent = `${answer.matched} pairs of ${answer.tiles.from} and ${answer.tiles.to} tiles, ` +
      `most changed first` + (unpaired.from.count || unpaired.to.count ? ` · without a partner: ` +
        `${unpaired.from.count} of ${answer.from}, ${unpaired.to.count} of ${answer.to}` : "");
    $("chstatus").classList.remove("error");
  }

  function fields(s) {
    const out = { from: s.from, to: s.to, k: SHOWN };
    if (s.bbox) out.bbox = s.bbox;
    if (s.bbox && s.inside) out.inside = "true";
    if (s.archive) out.archive = s.archive;
    return out;
  }

  async function load() {
    const s = address();
    const section = $("changes");
    $("chfrom").value = s.from;
    $("chto").value = s.to;
    $("chclear").disabled = !s.from;
    const mine = ++ticket;
    if (!s.from || !s.to) {
      pairs = [];
      selected = null;
      $("pairs").replaceChildren();
      $("chstatus").textContent = "";
      $("chgeojson").hidden = true;
      section.dataset.state = "empty";
      showPair();
      draw();
      return;
    }
    section.dataset.state = "loading";
    const query = new URLSearchParams(fields(s)).toString();
    $("chgeojson").href = "/api/changes.geojson?" + query;
    $("chgeojson").hidden = false;
    try {
      const response = await fetch("/api/changes?" + query);
      const answer = await response.json().catch(() => ({ error: "the service answered " + response.status }));
      if (mine !== ticket) return;
      if (!response.ok) throw new Error(answer.error || "the service answered " + response.status);
      pairs = answer.pairs;
      selected = pairs.some((p) => p.rank === s.pair) ? s.pair : null;
      listPairs(answer);
      showPair();
      draw();
      section.dataset.state = "done";
    } catch (error) {
      if (mine !== ticket) return;
      pairs = [];
      $("pairs").replaceChildren();
      showPair();
      draw();
      $("chstatus").textContent = "Error: " + error.message;
      $("chstatus").classList.add("error");
      section.dataset.state = "error";
    }
  }

  async function fillDates() { // the dates the archive's scenes were acquired on, from their outlines
    const s = address();
    const info = await (await fetch("/api/info")).json();
    const archive = info.archives.find((a) => a.name === (s.archive || info.default)) || info.archives[0];
    if (!archive || archive.name === archiveName) return archive;
    archiveName = archive.name;
    const scenes = archive.places ? await (await fetch("/api/scenes?archive=" +
      encodeURIComponent(archive.name))).json() : { features: [] };
    const dates = [...new Set(scenes.features.flatMap((f) => f.properties.dates))].sort();
    for (const select of [$("chfrom"), $("chto")]) {
      select.replaceChildren(el("option", { value: "" }, "—"), ...dates.map((d) => el("option", { value: d }, d)));
    }
    $("changes").hidden = dates.length < 2;
    return archive;
  }

  async function refresh() {
    try {
      await fillDates();
    } catch (error) {
      return; // no info: the page says so itself
    }
    if (window.duchMap) attach(window.duchMap);
    load();
  }

  // The search's own addresses (app.js builds them from its keys) carry the change keys along, so that a box drawn
  // on the map, or a search, keeps the layer; only this file's own changes set or clear them.
  for (const name of ["pushState", "replaceState"]) {
    const original = history[name].bind(history);
    history[name] = (state, title, url) => {
      if (!own && url !== undefined && url !== null) {
        const now = new URLSearchParams(location.search);
        const next = new URL(url, location.href);
        for (const key of KEYS) {
          if (now.has(key) && !next.searchParams.has(key)) next.searchParams.set(key, now.get(key));
        }
        url = next.search.replace(/%2C/g, ",") || "?";
      }
      return original(state, title, url);
    };
  }

  function watched(s) { // what the pairs depend on in the address
    return JSON.stringify([s.from, s.to, s.bbox, s.inside, s.archive]);
  }

  function start() {
    let last = null;
    // app.js marks <body> with each address it renders (after making the map, on the first one): follow it.
    new MutationObserver(() => {
      if (window.duchMap) attach(window.duchMap);
      const now = watched(address());
      if (now !== last) {
        last = now;
        refresh();
      }
    }).observe(document.body, { attributes: true, attributeFilter: ["data-query"] });
    $("chshow").addEventListener("click", () => {
      if (!$("chfrom").value || !$("chto").value) return;
      setAddress({ cfrom: $("chfrom").value, cto: $("chto").value, pair: "" });
      load();
    });
    $("chclear").addEventListener("click", () => {
      setAddress({ cfrom: "", cto: "", pair: "" });
      load();
    });
    refresh();
  }

  window.duchChanges = { pairs: () => pairs, selected: () => selected };
  start();
})();
