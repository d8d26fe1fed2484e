// A small SVG line chart for training curves, drawn by hand: no library, no build.
// Points arrive one step at a time; a long run is drawn decimated to min/max per pixel
// column, so a million steps cost the same to draw as a thousand.

const NS = "http://www.w3.org/2000/svg";
const MARGIN = { top: 12, right: 16, bottom: 26, left: 56 };

function svg(tag, attributes = {}, text = null) {
  const element = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text !== null) element.textContent = text;
  return element;
}

export function formatNumber(value) {
  if (!Number.isFinite(value)) return "–";
  const size = Math.abs(value);
  if (size === 0) return "0";
  if (size >= 1e5 || size < 1e-4) return value.toExponential(1);
  if (size >= 100) return value.toFixed(0);
  return String(Number(value.toPrecision(3)));
}

// About `count` round numbers spanning [min, max].
function niceTicks(min, max, count) {
  if (min === max) return [min];
  const raw = (max - min) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || 10 * power;
  const ticks = [];
  for (let tick = Math.ceil(min / step) * step; tick <= max + step * 1e-9; tick += step) {
    ticks.push(Number(tick.toPrecision(12)));
  }
  return ticks;
}

function logTicks(min, max) {
  const ticks = [];
  for (let power = Math.floor(min); power <= Math.ceil(max); power += 1) {
    for (const m of max - min < 1.5 ? [1, 2, 5] : [1]) {
      const value = Math.log10(m * 10 ** power);
      if (value >= min - 1e-9 && value <= max + 1e-9) ticks.push(value);
    }
  }
  return ticks;
}

// The last index whose x is at most `x` (xs ascending).
function indexAtOrBefore(xs, x) {
  let low = 0;
  let high = xs.length - 1;
  while (low < high) {
    const middle = (low + high + 1) >> 1;
    if (xs[middle] <= x) low = middle;
    else high = middle - 1;
  }
  return low;
}

export class LineChart {
  // series: [{ name, className, dots }]; the first one is the main curve.
  constructor(container, { series, height = 220, emptyText = "No data yet" }) {
    this.container = container;
    this.series = series.map((spec) => ({ ...spec, xs: [], ys: [] }));
    this.height = height;
    this.emptyText = emptyText;
    this.log = false;
    this.xMax = null;
    this.frame = null;
    this.hoverX = null;
    new ResizeObserver(() => this.schedule()).observe(container);
    container.addEventListener("pointermove", (event) => this.hover(event));
    container.addEventListener("pointerleave", () => { this.hoverX = null; this.schedule(); });
    this.schedule();
  }

  add(index, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    const series = this.series[index];
    // A run resumed from a checkpoint trains its last steps again: the new values win.
    while (series.xs.length && series.xs[series.xs.length - 1] >= x) {
      series.xs.pop();
      series.ys.pop();
    }
    series.xs.push(x);
    series.ys.push(y);
    if (index === 0) this.container.dataset.points = String(series.xs.length);
    this.schedule();
  }

  // Forget every point: the chart is about to show another job.
  reset() {
    for (const series of this.series) {
      series.xs = [];
      series.ys = [];
    }
    this.xMax = null;
    this.hoverX = null;
    this.container.dataset.points = "0";
    this.schedule();
  }

  // The newest value of a series, or null.
  last(index) {
    const { ys } = this.series[index];
    return ys.length ? ys[ys.length - 1] : null;
  }

  setLog(log) { this.log = log; this.schedule(); }

  setXMax(xMax) {
    if (xMax !== this.xMax) { this.xMax = xMax; this.schedule(); }
  }

  schedule() {
    if (this.frame === null) {
      this.frame = requestAnimationFrame(() => { this.frame = null; this.render(); });
    }
  }

  value(y) {
    return this.log ? Math.log10(y) : y;
  }

  domain() {
    let xMin = Infinity;
    let xMax = -Infinity;
    let yMin = Infinity;
    let yMax = -Infinity;
    for (const series of this.series) {
      for (let i = 0; i < series.xs.length; i += 1) {
        const y = series.ys[i];
        if (this.log && y <= 0) continue;
        const v = this.value(y);
        xMin = Math.min(xMin, series.xs[i]);
        xMax = Math.max(xMax, series.xs[i]);
        yMin = Math.min(yMin, v);
        yMax = Math.max(yMax, v);
      }
    }
    if (!Number.isFinite(xMin)) return null;
    xMin = Math.min(xMin, 0);
    if (this.xMax) xMax = Math.max(xMax, this.xMax);
    if (xMax === xMin) xMax = xMin + 1;
    const pad = (yMax - yMin) * 0.06 || Math.abs(yMax) * 0.1 || 1;
    yMin -= pad;
    yMax += pad;
    if (!this.log && yMin < 0 && this.series.every((s) => s.ys.every((y) => y >= 0))) yMin = 0;
    return { xMin, xMax, yMin, yMax };
  }

  hover(event) {
    const box = this.container.getBoundingClientRect();
    this.hoverX = event.clientX - box.left;
    this.schedule();
  }

  render() {
    const width = this.container.clientWidth;
    if (!width) return;
    const height = this.height;
    const plotWidth = width - MARGIN.left - MARGIN.right;
    const plotHeight = height - MARGIN.top - MARGIN.bottom;
    const root = svg("svg", {
      width, height, viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart-svg",
    });
    const domain = this.domain();
    if (!domain) {
      root.append(svg("text", {
        x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle",
      }, this.emptyText));
      this.container.replaceChildren(root);
      return;
    }
    const { xMin, xMax, yMin, yMax } = domain;
    const sx = (x) => MARGIN.left + ((x - xMin) / (xMax - xMin)) * plotWidth;
    const sy = (v) => MARGIN.top + (1 - (v - yMin) / (yMax - yMin)) * plotHeight;

    const grid = svg("g", { class: "chart-grid" });
    const yTicks = this.log ? logTicks(yMin, yMax) : niceTicks(yMin, yMax, 4);
    for (const tick of yTicks) {
      const y = sy(tick);
      if (y < MARGIN.top - 0.5 || y > MARGIN.top + plotHeight + 0.5) continue;
      grid.append(svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y, y2: y }));
      grid.append(svg("text", {
        x: MARGIN.left - 8, y: y + 4, "text-anchor": "end", class: "chart-label",
      }, formatNumber(this.log ? 10 ** tick : tick)));
    }
    for (const tick of niceTicks(xMin, xMax, Math.max(2, Math.floor(plotWidth / 110)))) {
      if (tick < xMin || tick > xMax) continue;
      grid.append(svg("text", {
        x: sx(tick), y: height - 7, "text-anchor": "middle", class: "chart-label",
      }, formatNumber(tick)));
    }
    grid.append(svg("line", {
      x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + plotHeight,
      y2: MARGIN.top + plotHeight, class: "chart-axis",
    }));
    root.append(grid);

    for (const series of this.series) {
      const points = this.decimate(series, sx, sy);
      if (!points.length) continue;
      const d = points.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`);
      root.append(svg("path", { d: d.join(""), class: `chart-line ${series.className}` }));
      if (series.dots) {
        for (const [x, y] of points) {
          const dot = { cx: x, cy: y, r: 3, class: `chart-dot ${series.className}` };
          root.append(svg("circle", dot));
        }
      }
    }
    this.drawHover(root, sx, sy, plotHeight, width);
    this.container.replaceChildren(root);
  }

  // Screen points of a series; past two points per pixel column, each column's
  // first, lowest, highest and last value, so that spikes stay visible.
  decimate(series, sx, sy) {
    const points = [];
    const columns = new Map();
    const dense = series.xs.length > 2 * (this.container.clientWidth || 1);
    for (let i = 0; i < series.xs.length; i += 1) {
      if (this.log && series.ys[i] <= 0) continue;
      const x = sx(series.xs[i]);
      const y = sy(this.value(series.ys[i]));
      if (!dense) { points.push([x, y]); continue; }
      const column = Math.round(x);
      const seen = columns.get(column);
      if (!seen) columns.set(column, { first: y, low: y, high: y, last: y });
      else { seen.low = Math.min(seen.low, y); seen.high = Math.max(seen.high, y); seen.last = y; }
    }
    for (const [column, c] of columns) {
      points.push([column, c.first], [column, c.low], [column, c.high], [column, c.last]);
    }
    return points;
  }

  drawHover(root, sx, sy, plotHeight, width) {
    const main = this.series[0];
    if (this.hoverX === null || !main.xs.length) return;
    const { xMin, xMax } = this.domain();
    const plotWidth = width - MARGIN.left - MARGIN.right;
    const step = xMin + ((this.hoverX - MARGIN.left) / plotWidth) * (xMax - xMin);
    let i = indexAtOrBefore(main.xs, step);
    if (i + 1 < main.xs.length && Math.abs(main.xs[i + 1] - step) < Math.abs(main.xs[i] - step)) {
      i += 1;
    }
    if (this.log && main.ys[i] <= 0) return;
    const x = sx(main.xs[i]);
    const y = sy(this.value(main.ys[i]));
    const group = svg("g", { class: "chart-hover" });
    group.append(svg("line", { x1: x, x2: x, y1: MARGIN.top, y2: MARGIN.top + plotHeight }));
    group.append(svg("circle", { cx: x, cy: y, r: 4, class: main.className }));
    const label = `step ${main.xs[i]}  ·  ${formatNumber(main.ys[i])}`;
    const labelWidth = label.length * 6.6 + 16;
    const rightmost = width - MARGIN.right - labelWidth;
    const left = Math.min(Math.max(x - labelWidth / 2, MARGIN.left), rightmost);
    group.append(svg("rect", { x: left, y: MARGIN.top, width: labelWidth, height: 22, rx: 5 }));
    group.append(svg("text", {
      x: left + labelWidth / 2, y: MARGIN.top + 15, "text-anchor": "middle",
    }, label));
    root.append(group);
  }
}
