// Qwen-Image GGUF: the presets' model files from inside ComfyUI.
// - A loaded workflow naming a diffusion-model quant that is not installed, where another quant of the
//   same model is, is switched to the installed one (the loader does the same for API prompts).
// - Files of this package's manifest that a workflow needs and that are missing are listed in a panel
//   with a Download button each: progress (size, speed, time left), resume, size/sha256 checks
//   happen on the server (nodes/integration/model_files.py); the loaders' file lists refresh when done.
// - The template browser lists this package's presets in their intended order.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PACKAGE = "ComfyUI-QwenImage-GGUF";
const POLL_MS = 700;
// ComfyUI's own widgets in the graph's bottom-right corner (its minimap and canvas controls): the
// panel sits above the highest of them, so that it covers none.
const CORNER_WIDGETS = ["minimap-container", "zoom-controls-button", "toggle-minimap-button"]
  .map((id) => `[data-testid="${id}"]`).join(", ");
const PANEL_WIDTH = 520;
const MARGIN = 16;
// Above the graph and its widgets, below ComfyUI's menus, dialogs and toasts (1800 and up).
const PANEL_Z = 1000;

async function getStatus() {
  const r = await api.fetchApi("/qwen_gguf/models", { cache: "no-store" });
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return r.json();
}

function human(n) {
  if (n == null) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${Math.round(n)} B`;
}

function humanTime(s) {
  if (s == null) return "?";
  s = Math.round(s);
  if (s >= 3600) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  if (s >= 60) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${s} s`;
}

function progressText(job) {
  const pct = job.total ? ` (${Math.floor((100 * job.done) / job.total)}%)` : "";
  const head = `${human(job.done)}${job.total ? " / " + human(job.total) : ""}${pct}`;
  if (job.state === "running") return `${head}, ${human(job.speed)}/s, ${humanTime(job.eta)} left${job.message ? " - " + job.message : ""}`;
  return job.message ? `${head} - ${job.message}` : head;
}

// Every string a workflow's nodes hold that names a file of the manifest.
function namedFiles(graphData, files) {
  const byName = new Map(files.map((f) => [f.name, f]));
  const out = new Map();
  for (const node of graphData?.nodes ?? []) {
    if (node.mode === 2 || node.mode === 4) continue;
    const values = Array.isArray(node.widgets_values) ? node.widgets_values : Object.values(node.widgets_values ?? {});
    for (const v of values) if (typeof v === "string" && byName.has(v)) out.set(v, byName.get(v));
  }
  return [...out.values()];
}

function substituteInstalled(graphData, files) {
  const subs = new Map(files.filter((f) => !f.installed && f.substitute).map((f) => [f.name, f.substitute]));
  const urls = new Map(files.map((f) => [f.name, f.url]));
  const done = [];
  for (const node of graphData?.nodes ?? []) {
    if (!Array.isArray(node.widgets_values)) continue;
    node.widgets_values = node.widgets_values.map((v) => {
      if (typeof v !== "string" || !subs.has(v)) return v;
      done.push([v, subs.get(v)]);
      return subs.get(v);
    });
    for (const m of node.properties?.models ?? []) {
      if (subs.has(m.name)) {
        m.name = subs.get(m.name);
        m.url = urls.get(m.name) ?? m.url;
      }
    }
  }
  return done;
}

function toast(severity, summary, detail) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity, summary, detail, life: 8000 });
  else console.log(`[${PACKAGE}] ${summary}: ${detail}`);
}

async function refreshFileLists() {
  try {
    await app.extensionManager?.command?.execute?.("Comfy.RefreshNodeDefinitions");
  } catch (e) {
    if (app.refreshComboInNodes) await app.refreshComboInNodes();
  }
}

class Panel {
  constructor() {
    this.el = null;
    this.files = [];
    this.timer = null;
  }

  show(files) {
    this.files = files;
    if (!this.el) this.build();
    this.el.style.display = "block";
    this.render();
    // The graph view may still be laying its widgets out (a workflow loaded at start-up).
    requestAnimationFrame(() => this.place());
  }

  place() {
    let bottom = MARGIN;
    for (const widget of document.querySelectorAll(CORNER_WIDGETS)) {
      const r = widget.getBoundingClientRect();
      if (r.width && r.height && r.right > window.innerWidth - PANEL_WIDTH - 2 * MARGIN) {
        bottom = Math.max(bottom, window.innerHeight - r.top + MARGIN / 2);
      }
    }
    this.el.style.bottom = `${bottom}px`;
    this.el.style.maxHeight = `${Math.max(160, Math.min(0.6 * window.innerHeight, window.innerHeight - bottom - 120))}px`;
  }

  hide() {
    if (this.el) this.el.style.display = "none";
  }

  build() {
    const el = document.createElement("div");
    el.id = "qwen-gguf-downloads";
    el.setAttribute("role", "region");
    el.setAttribute("aria-label", "Qwen-Image GGUF model downloads");
    Object.assign(el.style, {
      // Its bottom and height are set by place(), at every render.
      position: "fixed", right: `${MARGIN}px`, width: `${PANEL_WIDTH}px`, overflow: "auto", zIndex: PANEL_Z,
      background: "var(--comfy-menu-bg, #202020)", color: "var(--fg-color, #ddd)",
      border: "1px solid var(--border-color, #444)", borderRadius: "8px", padding: "12px",
      font: "13px sans-serif", boxShadow: "0 4px 16px rgba(0,0,0,.5)",
    });
    el.innerHTML = `<div style="display:flex;justify-content:space-between;align-items:center;margin-bottom:8px">
        <b>Qwen-Image GGUF: model files this workflow needs</b>
        <button class="qg-close" title="Close">✕</button></div>
      <div class="qg-rows"></div>
      <div style="margin-top:8px;display:flex;gap:8px">
        <button class="qg-all">Download all missing</button></div>`;
    el.querySelector(".qg-close").onclick = () => this.hide();
    el.querySelector(".qg-all").onclick = () => this.files.filter((f) => !f.installed).forEach((f) => this.start(f.name));
    document.body.appendChild(el);
    this.el = el;
    window.addEventListener("resize", () => {
      if (el.style.display !== "none") this.place();
    });
  }

  render() {
    // Also on every progress update: the user may have opened or closed the minimap meanwhile.
    this.place();
    const rows = this.el.querySelector(".qg-rows");
    rows.innerHTML = "";
    for (const f of this.files) {
      const row = document.createElement("div");
      row.className = "qg-row";
      row.dataset.name = f.name;
      row.style.margin = "6px 0";
      const job = f.job;
      const running = job && (job.state === "running" || job.state === "verifying");
      let state;
      if (f.installed) state = "installed";
      else if (running) state = progressText(job);
      else if (job?.state === "error") state = `failed: ${job.message}`;
      else state = `missing${f.size != null ? `, ${human(f.size)}` : ""}${f.partial ? ` (${human(f.partial)} downloaded, resumes)` : ""}`;
      const pct = f.installed ? 100 : job?.total ? (100 * job.done) / job.total : 0;
      row.innerHTML = `<div style="display:flex;justify-content:space-between;gap:8px">
          <span><code></code> <small style="opacity:.7">models/${f.folder}</small></span>
          <button class="qg-get"></button></div>
        <div style="height:6px;background:#444;border-radius:3px;margin:4px 0">
          <div class="qg-bar" style="height:6px;border-radius:3px;background:#4a9;width:${pct.toFixed(1)}%"></div></div>
        <small class="qg-state"></small>`;
      row.querySelector("code").textContent = f.name;
      row.querySelector(".qg-state").textContent = state;
      const button = row.querySelector(".qg-get");
      button.textContent = f.installed ? "Done" : running ? "Cancel" : job?.state === "error" ? "Retry" : "Download";
      button.disabled = f.installed;
      button.onclick = () => (running ? this.cancel(f.name) : this.start(f.name));
      rows.appendChild(row);
    }
  }

  async start(name) {
    const r = await api.fetchApi("/qwen_gguf/download", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }),
    });
    if (!r.ok) toast("error", "Download refused", (await r.json()).error ?? `HTTP ${r.status}`);
    this.poll();
  }

  async cancel(name) {
    await api.fetchApi("/qwen_gguf/cancel", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }),
    });
    this.poll();
  }

  poll() {
    if (this.timer) return;
    const tick = async () => {
      this.timer = null;
      const status = await getStatus();
      const names = new Set(this.files.map((f) => f.name));
      const before = new Map(this.files.map((f) => [f.name, f.installed]));
      this.files = status.files.filter((f) => names.has(f.name));
      this.render();
      if (this.files.some((f) => f.installed && !before.get(f.name))) {
        await refreshFileLists();
        const done = this.files.filter((f) => f.installed && !before.get(f.name)).map((f) => f.name);
        toast("success", "Model downloaded", done.join(", "));
      }
      if (this.files.some((f) => f.job && (f.job.state === "running" || f.job.state === "verifying"))) {
        this.timer = setTimeout(tick, POLL_MS);
      }
    };
    this.timer = setTimeout(tick, 0);
  }
}

const panel = new Panel();

app.registerExtension({
  name: "QwenImageGGUF.ModelDownloads",

  async setup() {
    // The template browser lists a package's presets in the order the server's glob finds them.
    const list = api.getWorkflowTemplates.bind(api);
    api.getWorkflowTemplates = async () => {
      const templates = await list();
      try {
        const status = await getStatus();
        const key = status.package;
        if (key in templates) {
          const order = status.presets;
          const rank = (n) => (order.indexOf(n) < 0 ? order.length : order.indexOf(n));
          templates[key] = [...templates[key]].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
        }
      } catch (e) {
        console.warn(`[${PACKAGE}] could not order the presets`, e);
      }
      return templates;
    };
  },

  async beforeConfigureGraph(graphData) {
    try {
      const status = await getStatus();
      const done = substituteInstalled(graphData, status.files);
      for (const [asked, used] of done) {
        toast("info", "Using the installed quant", `${asked} is not installed; this workflow now uses ${used}.`);
      }
      const needed = namedFiles(graphData, status.files);
      const missing = needed.filter((f) => !f.installed);
      if (missing.length) panel.show(missing);
      else panel.hide();
    } catch (e) {
      console.warn(`[${PACKAGE}] could not check the workflow's model files`, e);
    }
  },

  commands: [{
    id: "QwenImageGGUF.ShowModelFiles",
    label: "Qwen-Image GGUF: model files of this workflow",
    function: async () => {
      const status = await getStatus();
      panel.show(namedFiles(app.graph.serialize(), status.files));
      panel.poll();
    },
  }],
});
