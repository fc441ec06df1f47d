// duch's map panel for archives of scene tiles: footprints on a Web-Mercator map drawn in SVG by this file alone
// (no library). Offline it draws a lon/lat graticule, a scale bar, the scenes' outlines and the archive's extent;
// a basemap (XYZ tiles) is drawn beneath only when the service was started with --basemap URL. Drag draws the
// search box, shift-drag pans, the wheel and the +/- buttons zoom.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const TILE = 256; // pixels of a basemap tile
const MOST_LAT = 85.0511; // Web Mercator's square world
const EARTH_M = 40075016.686; // the equator, metres

// lon/lat -> the world square [0, 1] x [0, 1], y down (as XYZ tiles number it)
function mercator(lon, lat) {
  const s = Math.sin(Math.max(-MOST_LAT, Math.min(MOST_LAT, lat)) * Math.PI / 180);
  return [(lon + 180) / 360, 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)];
}

function lonlatOf(x, y) {
  return [x * 360 - 180, Math.atan(Math.sinh(Math.PI * (1 - 2 * y))) * 180 / Math.PI];
}

function node(tag, attrs = {}, text = null) {
  const n = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) n.setAttribute(key, value);
  if (text !== null) n.textContent = text;
  return n;
}

function nice(value) { // the largest of 1, 2, 5 x 10^k not above value
  const p = Math.pow(10, Math.floor(Math.log10(value)));
  return [5, 2, 1].map((m) => m * p).find((v) => v <= value) || p;
}

class DuchMap {
  // handlers: onBox([minlon, minlat, maxlon, maxlat]) when a box is drawn, onPick(id) when a footprint is
  // clicked, onHover(id or null) when the pointer enters or leaves one, onPoint(lon, lat) when a point off the
  // footprints and off the change pairs is clicked ("near here").
  constructor(svg, handlers) {
    this.el = svg;
    this.on = handlers;
    this.view = { x: 0.5, y: 0.5, scale: TILE };
    this.hits = [];
    this.scenes = [];
    this.extent = null;
    this.box = null;
    this.near = null; // [lon, lat, metres]: the `near` filter, drawn as a circle
    this.basemap = null;
    this.lit = null;
    this.layers = {};
    for (const name of ["base", "grid", "scenes", "extent", "hits", "box", "drag", "scale"]) {
      this.layers[name] = svg.appendChild(node("g", { class: name }));
    }
    this.drag = null;
    svg.addEventListener("pointerdown", (e) => this.down(e));
    svg.addEventListener("pointermove", (e) => this.move(e));
    svg.addEventListener("pointerup", (e) => this.up(e));
    svg.addEventListener("pointerover", (e) => this.hover(e, true));
    svg.addEventListener("pointerout", (e) => this.hover(e, false));
    svg.addEventListener("wheel", (e) => {
      e.preventDefault();
      const [px, py] = this.local(e);
      this.zoom(Math.exp(-e.deltaY * 0.002), px, py);
    }, { passive: false });
    new ResizeObserver(() => this.draw()).observe(svg);
  }

  size() {
    const r = this.el.getBoundingClientRect();
    return [r.width || 1, r.height || 1];
  }

  local(e) {
    const r = this.el.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top];
  }

  project(lon, lat) { // lon/lat -> pixels in the map
    const [x, y] = mercator(lon, lat);
    const [w, h] = this.size();
    return [(x - this.view.x) * this.view.scale + w / 2, (y - this.view.y) * this.view.scale + h / 2];
  }

  unproject(px, py) {
    const [w, h] = this.size();
    return lonlatOf(this.view.x + (px - w / 2) / this.view.scale, this.view.y + (py - h / 2) / this.view.scale);
  }

  toClient(lon, lat) { // lon/lat -> page coordinates (for a script driving the page)
    const [px, py] = this.project(lon, lat);
    const r = this.el.getBoundingClientRect();
    return [r.left + px, r.top + py];
  }

  fit(bounds, pad = 28) { // show [minlon, minlat, maxlon, maxlat] whole
    if (!bounds) return;
    const [x0, y1] = mercator(bounds[0], bounds[1]);
    const [x1, y0] = mercator(bounds[2], bounds[3]);
    const [w, h] = this.size();
    const scale = Math.min((w - 2 * pad) / Math.max(x1 - x0, 1e-12), (h - 2 * pad) / Math.max(y1 - y0, 1e-12));
    this.view = { x: (x0 + x1) / 2, y: (y0 + y1) / 2, scale: Math.max(TILE, Math.min(2 ** 32, scale)) };
    this.draw();
  }

  zoom(factor, px, py) { // keeps the point under (px, py) where it is
    const [w, h] = this.size();
    const wx = this.view.x + (px - w / 2) / this.view.scale;
    const wy = this.view.y + (py - h / 2) / this.view.scale;
    const scale = Math.max(TILE, Math.min(2 ** 32, this.view.scale * factor));
    this.view = { x: wx - (px - w / 2) / scale, y: wy - (py - h / 2) / scale, scale };
    this.draw();
  }

  hitBounds() { // the lon/lat bounds of the hits' footprints, or null
    const b = this.hits.map((h) => h.place && h.place.bounds).filter(Boolean);
    if (!b.length) return null;
    return [Math.min(...b.map((v) => v[0])), Math.min(...b.map((v) => v[1])), Math.max(...b.map((v) => v[2])),
      Math.max(...b.map((v) => v[3]))];
  }

  set(what, value) { // "hits", "scenes", "extent", "box", "near" or "basemap"
    this[what] = value;
    this.draw();
  }

  highlight(id) {
    this.lit = id;
    for (const n of this.el.querySelectorAll("[data-id]")) n.classList.toggle("on", n.dataset.id === id);
  }

  down(e) {
    if (e.button !== 0) return;
    this.el.setPointerCapture(e.pointerId);
    const target = e.target.closest("[data-id]");
    this.drag = { mode: e.shiftKey ? "pan" : "box", start: this.local(e), view: { ...this.view },
      pick: target ? target.dataset.id : null, onShape: e.target.closest("[data-pair]") !== null };
  }

  move(e) {
    if (!this.drag) return;
    const [px, py] = this.local(e);
    const [sx, sy] = this.drag.start;
    if (this.drag.mode === "pan") {
      const v = this.drag.view;
      this.view = { x: v.x - (px - sx) / v.scale, y: v.y - (py - sy) / v.scale, scale: v.scale };
      this.draw();
      return;
    }
    this.layers.drag.replaceChildren(node("rect", { class: "drawing", x: Math.min(px, sx), y: Math.min(py, sy),
      width: Math.abs(px - sx), height: Math.abs(py - sy) }));
  }

  up(e) {
    const drag = this.drag;
    this.drag = null;
    this.layers.drag.replaceChildren();
    if (!drag) return;
    const [px, py] = this.local(e);
    const [sx, sy] = drag.start;
    const moved = Math.abs(px - sx) >= 5 && Math.abs(py - sy) >= 5;
    if (moved) this.on.onHover(null); // what the drag started over is no longer pointed at
    if (drag.mode === "box" && moved) {
      const [lon0, lat0] = this.unproject(Math.min(px, sx), Math.max(py, sy));
      const [lon1, lat1] = this.unproject(Math.max(px, sx), Math.min(py, sy));
      const round = (v) => Math.round(v * 1e6) / 1e6; // a tenth of a metre, enough for a box drawn by hand
      this.on.onBox([round(lon0), round(lat0), round(lon1), round(lat1)]);
    } else if (!moved && drag.pick) {
      this.on.onPick(drag.pick);
    } else if (!moved && drag.mode === "box" && !drag.onShape && this.on.onPoint) {
      // a click on another layer's shape (a change pair) is that layer's, not "near here"
      const [lon, lat] = this.unproject(px, py);
      const round = (v) => Math.round(v * 1e6) / 1e6;
      this.on.onPoint(round(lon), round(lat));
    }
  }

  hover(e, entering) {
    if (this.drag) return;
    const target = e.target.closest("[data-id]");
    if (target) this.on.onHover(entering ? target.dataset.id : null);
  }

  draw() {
    const [w, h] = this.size();
    this.el.setAttribute("viewBox", `0 0 ${w} ${h}`);
    this.drawBasemap(w, h);
    this.drawGrid(w, h);
    const ring = (corners) => corners.map(([lon, lat]) => this.project(lon, lat).map((v) => v.toFixed(1))
      .join(",")).join(" ");
    this.layers.scenes.replaceChildren(...this.scenes.filter((f) => f.geometry).map((f) => {
      const outline = node("polygon", { class: "scene", points: ring(f.geometry.coordinates[0]) });
      outline.append(node("title", {}, `${f.properties.scene}: ${f.properties.tiles} tiles` +
        (f.properties.date ? `, ${f.properties.date}` : "")));
      return outline;
    }));
    this.layers.extent.replaceChildren();
    if (this.extent) this.layers.extent.append(this.rect(this.extent, "extent"));
    this.layers.box.replaceChildren();
    if (this.box) this.layers.box.append(this.rect(this.box, "searchbox"));
    if (this.near) this.layers.box.append(...this.circle(this.near));
    this.drawHits(ring);
    this.drawScale(w, h);
  }

  circle([lon, lat, metres]) { // the near filter: its point and (the Mercator picture of) its radius
    const [cx, cy] = this.project(lon, lat);
    const [, top] = this.project(lon, Math.min(89.9, lat + metres / 111195)); // a degree of latitude in metres
    return [node("circle", { class: "nearzone", cx, cy, r: Math.max(cy - top, 0) }),
      node("circle", { class: "nearpoint", cx, cy, r: 4 })];
  }

  rect(b, cls) {
    const [x0, y1] = this.project(b[0], b[1]);
    const [x1, y0] = this.project(b[2], b[3]);
    return node("rect", { class: cls, x: x0, y: y0, width: Math.max(x1 - x0, 1), height: Math.max(y1 - y0, 1) });
  }

  drawHits(ring) {
    const shapes = [];
    const labels = [];
    for (const hit of this.hits) {
      if (!hit.place || !hit.place.lonlat) continue; // an ungeoreferenced tile has no place on a map
      const px = hit.place.lonlat.map(([lon, lat]) => this.project(lon, lat));
      const cx = px.reduce((s, p) => s + p[0], 0) / px.length;
      const cy = px.reduce((s, p) => s + p[1], 0) / px.length;
      const span = Math.max(...px.map((p) => p[0])) - Math.min(...px.map((p) => p[0]));
      const poly = node("polygon", { class: "footprint", points: ring(hit.place.lonlat), "data-id": hit.id });
      poly.append(node("title", {}, `${hit.rank}. ${hit.id} · d ${hit.distance}` +
        (hit.place.date ? ` · ${hit.place.date}` : "")));
      shapes.push(poly);
      if (span >= 16) {
        labels.push(node("text", { class: "rank", x: cx, y: cy, "data-id": hit.id }, String(hit.rank)));
      } else { // too small to read at this zoom: a marker that stays visible
        labels.push(node("circle", { class: "marker", cx, cy, r: 4, "data-id": hit.id }));
      }
    }
    this.layers.hits.replaceChildren(...shapes, ...labels);
    this.highlight(this.lit);
  }

  drawBasemap(w, h) {
    const layer = this.layers.base;
    layer.replaceChildren();
    if (!this.basemap) return;
    const z = Math.max(0, Math.min(19, Math.round(Math.log2(this.view.scale / TILE))));
    const n = 2 ** z;
    const size = this.view.scale / n;
    const left = this.view.x - w / 2 / this.view.scale;
    const top = this.view.y - h / 2 / this.view.scale;
    const x0 = Math.floor(left * n);
    const y0 = Math.max(0, Math.floor(top * n));
    const x1 = Math.floor((left + w / this.view.scale) * n);
    const y1 = Math.min(n - 1, Math.floor((top + h / this.view.scale) * n));
    if ((x1 - x0 + 1) * (y1 - y0 + 1) > 200) return; // never a flood of requests
    for (let ty = y0; ty <= y1; ty++) {
      for (let tx = x0; tx <= x1; tx++) {
        const url = this.basemap.replace("{z}", z).replace("{x}", ((tx % n) + n) % n).replace("{y}", ty);
        layer.append(node("image", { class: "tile", href: url, x: (tx / n - left) * this.view.scale,
          y: (ty / n - top) * this.view.scale, width: size + 0.5, height: size + 0.5 }));
      }
    }
  }

  drawGrid(w, h) {
    const [lonL, latB] = this.unproject(0, h);
    const [lonR, latT] = this.unproject(w, 0);
    const lines = [];
    for (const [axis, lo, hi] of [["lon", lonL, lonR], ["lat", latB, latT]]) {
      const step = nice((hi - lo) / 4);
      const digits = Math.max(0, -Math.floor(Math.log10(step)));
      for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) {
        const label = `${v.toFixed(digits)}°`;
        if (axis === "lon") {
          const [x] = this.project(v, latB);
          lines.push(node("line", { x1: x, y1: 0, x2: x, y2: h }), node("text", { x: x + 3, y: 12 }, label));
        } else {
          const [, y] = this.project(lonL, v);
          lines.push(node("line", { x1: 0, y1: y, x2: w, y2: y }), node("text", { x: 4, y: y - 3 }, label));
        }
      }
    }
    this.layers.grid.replaceChildren(...lines);
  }

  drawScale(w, h) {
    const [, lat] = this.unproject(w / 2, h / 2);
    const metresPerPixel = EARTH_M * Math.cos(lat * Math.PI / 180) / this.view.scale;
    const metres = nice(metresPerPixel * 120);
    const length = metres / metresPerPixel;
    const x = w - length - 14;
    this.layers.scale.replaceChildren(
      node("rect", { class: "scalebg", x: x - 6, y: h - 34, width: length + 12, height: 26 }),
      node("path", { d: `M${x},${h - 16}v6h${length}v-6` }),
      node("text", { x: x + length / 2, y: h - 19 }, metres >= 1000 ? `${metres / 1000} km` : `${metres} m`));
  }
}

window.DuchMap = DuchMap;
