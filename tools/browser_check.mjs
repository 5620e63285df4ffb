// Check AVSync in ComfyUI's real frontend, in headless Chromium, in the classic (LiteGraph canvas)
// renderer and in "Nodes 2.0" (Vue nodes, setting Comfy.VueNodes.Enabled):
//  1. the audio loader's upload button is there, clicking it opens a file chooser, the chosen file
//     lands in ComfyUI's input folder and is selected in `audio_file`;
//  2. every UI example workflow loads without missing nodes and with each saved value on the widget
//     it belongs to (serializing the loaded graph gives back the saved widgets_values);
//  3. AVSyncSyncScore shows its report text after a small workflow (EmptyImage frames + the example
//     wav) is queued from the UI;
//  1b/1c. tooltips show on hovering the audio loader's and the MTV nodes' widgets; the combos (demix
//     methods, MTV variant / storage / precision / windows) offer the schema's choices and default;
//  4. user mistakes queued from the UI (a demix method without its model, a missing MTV file) show
//     their one-line message naming the input, and no traceback.
// Prints JSON (a "failures" list; exit code 1 when it is not empty) and writes screenshots
// avsync_browser_<renderer>_*.png into SHOTS_DIR (default: the current folder).
//
// Needs a running ComfyUI with this pack in custom_nodes, Debian's chromium, and
// playwright-core (npm install playwright-core; it downloads no browser), e.g. in a scratch folder
// /tmp/fe-node, then run with NODE_PATH=/tmp/fe-node/node_modules.
//
// usage: node tools/browser_check.mjs [COMFYUI_URL] [COMFYUI_INPUT_DIR] [--renderer classic|vue|both]
//                                     [--shots SHOTS_DIR]
// The renderer setting is a user setting of that ComfyUI: it is set back to what it was at the end.
import fs from "fs";
import os from "os";
import { createRequire } from "module";
import path from "path";
import { fileURLToPath } from "url";

// require (not import) so that NODE_PATH=<scratch dir>/node_modules finds playwright-core
const { chromium } = createRequire(import.meta.url)("playwright-core");

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(name);
  if (i < 0) return dflt;
  const v = argv[i + 1];
  argv.splice(i, 2);
  return v;
};
const rendererArg = opt("--renderer", "both");
const shots = opt("--shots", ".");
const base = (argv[0] ?? "http://127.0.0.1:8188").replace(/\/$/, "");
const inputDir = argv[1] ?? "ComfyUI/input";
const renderers = rendererArg === "both" ? ["classic", "vue"] : [rendererArg];
if (!renderers.every((r) => r === "classic" || r === "vue")) throw new Error(`--renderer: expected classic, vue or both`);
fs.mkdirSync(shots, { recursive: true });
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const examples = path.join(repo, "example_workflows");
const VUE_SETTING = "Comfy.VueNodes.Enabled";
// the example workflows' inputs, as tools/comfyui_e2e.py copies them (their previews load)
for (const name of ["avsync_example.wav", "avsync_inbetween_first.png", "avsync_inbetween_last.png",
                    "movie_hello_512x288.mp4"])
  fs.copyFileSync(path.join(examples, name), path.join(inputDir, name));

async function api(method, route, body) {
  const resp = await fetch(base + route, { method, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!resp.ok) throw new Error(`${method} ${route}: ${resp.status}`);
  return method === "GET" ? resp.json() : null;
}

const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath: chromiumPath, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"] });
const savedSettings = await api("GET", "/api/settings");
const out = { url: base, failures: [] };
const fail = (renderer, what) => out.failures.push(`${renderer}: ${what}`);

async function checkRenderer(renderer) {
  const res = {};
  await api("POST", `/api/settings/${VUE_SETTING}`, renderer === "vue");
  // no first-run template browser over the canvas
  await api("POST", "/api/settings/Comfy.TutorialCompleted", true);
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e.stack ?? e).split("\n").slice(0, 3).join(" | ")));
  const warnings = [];
  page.on("console", (m) => {
    // "@ source file": a message logged from AVSync's own extension files names them, so counts as ours
    const line = `${m.text().split("\n")[0]} @ ${m.location()?.url ?? ""}`;
    // a failed load's console line has no URL: the response/requestfailed handlers record it
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) errors.push(line);
    if (m.type() === "warning" && /deprecat|internal module|avsync/i.test(line)) warnings.push(line);
  });
  page.on("response", (r) => { if (r.status() >= 400) errors.push(`${r.status()} ${r.url()}`); });
  page.on("requestfailed", (r) => errors.push(`${r.failure()?.errorText} ${r.url()}`));
  await page.goto(base);
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
  await page.waitForTimeout(3000);
  res.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  res.vue_setting = await page.evaluate((id) => app.extensionManager?.setting?.get?.(id) ?? app.ui?.settings?.getSettingValue?.(id),
                                        VUE_SETTING);
  if (Boolean(res.vue_setting) !== (renderer === "vue")) fail(renderer, `${VUE_SETTING} is ${res.vue_setting}`);
  const shot = (name) => page.screenshot({ path: path.join(shots, `avsync_browser_${renderer}_${name}.png`) });
  const dismissDialogs = () => page.keyboard.press("Escape").catch(() => {});

  // 1. the upload button on a fresh node, clicked as a user clicks it
  res.fresh = await page.evaluate(() => {
    app.graph.clear();
    const n = LiteGraph.createNode("AVSyncAudioLoader");
    n.pos = [150, 100];
    app.graph.add(n);
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 1;
    app.canvas.setDirty(true, true);
    return n.widgets.map((w) => [w.name, w.type, w.serialize ?? w.options?.serialize ?? true]);
  });
  await page.waitForTimeout(1500);
  const button = res.fresh.find((w) => w[1] === "button");
  if (!button) fail(renderer, "AVSyncAudioLoader has no upload button");
  let chooser = null;
  const chooserPromise = page.waitForEvent("filechooser", { timeout: 5000 }).catch(() => null);
  if (renderer === "vue") {
    // Vue nodes draw widgets as DOM: the button must be a real, visible button in the node
    const el = page.locator("[data-node-id] button", { hasText: /upload/i }).first();
    res.button_visible = await el.isVisible().catch(() => false);
    if (res.button_visible) await el.click();
  } else {
    const at = await page.evaluate(() => {
      const n = app.graph._nodes.find((x) => x.comfyClass === "AVSyncAudioLoader");
      const w = n.widgets.find((x) => x.type === "button");
      const h = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT;
      const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0] / 2, n.pos[1] + w.y + h / 2]);
      const r = app.canvas.canvas.getBoundingClientRect();
      return [r.left + x, r.top + y];
    });
    res.button_visible = true;
    await page.mouse.click(at[0], at[1]);
  }
  chooser = await chooserPromise;
  const uploadName = `avsync_browser_check_${renderer}_${process.pid}.wav`;
  const uploadSrc = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "avsync-")), uploadName);
  fs.copyFileSync(path.join(examples, "avsync_example.wav"), uploadSrc);
  res.button_opens_file_chooser = Boolean(chooser);
  if (chooser) {
    await chooser.setFiles(uploadSrc);
  } else {
    fail(renderer, "clicking the upload button opened no file chooser");
    await page.locator("input[data-avsync-upload]").last().setInputFiles(uploadSrc);
  }
  await page.waitForTimeout(2000);
  res.after_upload = await page.evaluate(() => {
    const n = app.graph._nodes.find((x) => x.comfyClass === "AVSyncAudioLoader");
    return n.widgets.find((w) => w.name === "audio_file").value;
  });
  const uploaded = path.join(inputDir, String(res.after_upload));
  res.uploaded_file_exists = fs.existsSync(uploaded) && fs.readFileSync(uploaded).equals(fs.readFileSync(uploadSrc));
  if (res.uploaded_file_exists) fs.rmSync(uploaded); // the check's own file, not the user's
  fs.rmSync(path.dirname(uploadSrc), { recursive: true });
  if (res.after_upload !== uploadName || !res.uploaded_file_exists)
    fail(renderer, `upload: audio_file is ${res.after_upload}, in input folder: ${res.uploaded_file_exists}`);
  res.serialized = await page.evaluate(() => app.graph.serialize().nodes.map((n) => [n.type, n.widgets_values]));
  if (JSON.stringify(res.serialized[0][1]).includes("upload")) fail(renderer, "the upload button is serialized");
  if (renderer === "vue") {
    res.vue_widget_labels = await page.locator("[data-node-id]").first().innerText().catch((e) => String(e));
  }
  await shot("fresh_node");

  // 1b. inputs' tooltips (from the node schema) show when hovering the widget: the audio loader's
  // audio_file, and the MTV nodes' widgets
  const info = await api("GET", "/object_info");
  const hoverTooltip = async (type, widget) => {
    const spec = info[type].input.required[widget] ?? info[type].input.optional[widget];
    const tip = spec[1].tooltip;
    await page.evaluate(([type]) => {
      app.graph.clear();
      const n = LiteGraph.createNode(type);
      n.pos = [150, 100];
      app.graph.add(n);
      app.canvas.ds.offset = [0, 0];
      app.canvas.ds.scale = 1;
      app.canvas.setDirty(true, true);
    }, [type]);
    await page.waitForTimeout(1000);
    if (renderer === "vue") {
      await page.locator("[data-node-id]").first().getByText(widget, { exact: true }).first().hover().catch(() => {});
    } else {
      const at = await page.evaluate(([type, widget]) => {
        const n = app.graph._nodes.find((x) => x.comfyClass === type);
        const w = n.widgets.find((x) => x.name === widget);
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + 40, n.pos[1] + w.y + 10]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + x, r.top + y];
      }, [type, widget]);
      await page.mouse.move(at[0] - 5, at[1]);
      await page.mouse.move(at[0], at[1], { steps: 3 });
    }
    await page.waitForTimeout(1500);
    const shown = await page.getByText(tip.slice(0, 40)).first().isVisible().catch(() => false);
    await page.mouse.move(700, 700); // off the node, onto empty canvas
    await page.waitForTimeout(300);
    return shown;
  };
  res.tooltips = {};
  for (const [type, widget] of [["AVSyncAudioLoader", "audio_file"], ["AVSyncMTVLoader", "variant"],
                                ["AVSyncMTVLoader", "storage"], ["AVSyncMTVLoader", "block_swap"],
                                ["AVSyncMTVGenerator", "steps"], ["AVSyncMTVGenerator", "windows"]]) {
    res.tooltips[`${type}.${widget}`] = await hoverTooltip(type, widget);
    if (!res.tooltips[`${type}.${widget}`]) fail(renderer, `no tooltip on hovering ${type}.${widget}`);
    if (widget === "audio_file") await shot("tooltip");
  }
  await shot("tooltip_mtv");

  // 1c. combo choices on the widgets are the schema's (demix methods, MTV variant / storage / windows)
  const combos = [["AVSyncDemixer", "method"], ["AVSyncMTVLoader", "variant"], ["AVSyncMTVLoader", "storage"],
                  ["AVSyncMTVLoader", "precision"], ["AVSyncMTVGenerator", "windows"]];
  res.combos = await page.evaluate((combos) => Object.fromEntries(combos.map(([type, widget]) => {
    const n = LiteGraph.createNode(type);
    const w = n.widgets.find((x) => x.name === widget);
    const v = w.options.values;
    return [`${type}.${widget}`, { values: typeof v === "function" ? v() : v, value: w.value }];
  })), combos);
  for (const [type, widget] of combos) {
    const spec = info[type].input.required[widget];
    const want = Array.isArray(spec[0]) ? spec[0] : spec[1].options;
    const got = res.combos[`${type}.${widget}`];
    if (JSON.stringify(got.values) !== JSON.stringify(want) || got.value !== (spec[1]?.default ?? want[0]))
      fail(renderer, `${type}.${widget}: widget offers ${JSON.stringify(got)}, schema ${JSON.stringify(spec)}`);
  }

  // 2. every UI example workflow: no missing node, every saved value back on its widget
  res.workflows = {};
  for (const f of fs.readdirSync(examples).filter((x) => x.endsWith(".json")).sort()) {
    const wf = JSON.parse(fs.readFileSync(path.join(examples, f)));
    const r = await page.evaluate(async (wf) => {
      await app.loadGraphData(structuredClone(wf));
      const missing = wf.nodes.map((n) => n.type).filter((t) => !LiteGraph.registered_node_types[t]);
      const saved = Object.fromEntries(wf.nodes.map((n) => [n.id, n.widgets_values ?? []]));
      // every saved value must come back at its place; a frontend may append values of widgets
      // the file did not save (core LoadImage's upload widget): listed, not a failure
      const shifted = [];
      const appended = [];
      for (const n of app.graph.serialize().nodes) {
        const now = n.widgets_values ?? [];
        const before = saved[n.id];
        if (JSON.stringify(now.slice(0, before.length)) !== JSON.stringify(before)) shifted.push([n.id, n.type, before, now]);
        else if (now.length > before.length) appended.push([n.id, n.type, now.slice(before.length)]);
      }
      const avsync = app.graph._nodes.filter((n) => n.comfyClass.startsWith("AVSync")).map((n) =>
        [n.id, n.comfyClass, Object.fromEntries(n.widgets.filter((w) => w.type !== "button").map((w) => [w.name, w.value]))]);
      return { missing, shifted, appended, avsync };
    }, wf);
    await page.waitForTimeout(1500);
    r.missing_dialog = await page.getByText(/missing node|not found/i).first().isVisible().catch(() => false);
    if (renderer === "vue") r.vue_nodes_drawn = await page.locator("[data-node-id]").count();
    if (r.missing.length || r.missing_dialog) fail(renderer, `${f}: missing nodes ${r.missing}`);
    if (r.shifted.length) fail(renderer, `${f}: widget values moved ${JSON.stringify(r.shifted)}`);
    if (renderer === "vue" && r.vue_nodes_drawn !== wf.nodes.length)
      fail(renderer, `${f}: ${r.vue_nodes_drawn} Vue nodes drawn for ${wf.nodes.length} nodes`);
    res.workflows[f] = r;
    await shot(f.replace(".json", ""));
    await dismissDialogs();
  }

  // the upload button's hidden file inputs go with their nodes (no leak across workflow loads)
  res.upload_inputs = await page.evaluate(() => [document.querySelectorAll("input[data-avsync-upload]").length,
    app.graph._nodes.filter((n) => n.comfyClass === "AVSyncAudioLoader").length]);
  if (res.upload_inputs[0] !== res.upload_inputs[1])
    fail(renderer, `${res.upload_inputs[0]} upload inputs in the page for ${res.upload_inputs[1]} audio loaders`);

  // 3. the sync report text appears on AVSyncSyncScore after a run queued from the UI
  await page.evaluate(() => {
    app.graph.clear();
    const add = (type, pos, values) => {
      const n = LiteGraph.createNode(type);
      n.pos = pos;
      app.graph.add(n);
      for (const [k, v] of Object.entries(values)) n.widgets.find((w) => w.name === k).value = v;
      return n;
    };
    const frames = add("EmptyImage", [120, 80], { width: 64, height: 64, batch_size: 24 });
    const audio = add("AVSyncAudioLoader", [120, 320], { audio_file: "avsync_example.wav", duration: 1.0 });
    const score = add("AVSyncSyncScore", [500, 80], { fps: 24 });
    frames.connect(0, score, score.inputs.findIndex((i) => i.name === "images"));
    audio.connect(0, score, score.inputs.findIndex((i) => i.name === "audio"));
    app.canvas.ds.offset = [0, 0];
    app.canvas.ds.scale = 1;
    app.canvas.setDirty(true, true);
  });
  await page.waitForTimeout(1000);
  await page.evaluate(() => app.queuePrompt(0, 1));
  res.report = await page.waitForFunction(() => {
    const n = app.graph._nodes.find((x) => x.comfyClass === "AVSyncSyncScore");
    const w = n?.widgets?.find((x) => x.name === "sync_report");
    return w && w.value ? w.value : null;
  }, null, { timeout: 120000 }).then((h) => h.jsonValue()).catch(() => null);
  await page.waitForTimeout(1500);
  if (!res.report) fail(renderer, "no sync report text on AVSyncSyncScore after the run");
  // what the user sees: the report's text on the node (a textarea in both renderers)
  res.report_shown = await page.evaluate(() => [...document.querySelectorAll("textarea")].some(
    (t) => t.value && t.value.length > 20 && t.offsetParent !== null && /av|sync|offset/i.test(t.value)));
  if (res.report && !res.report_shown) fail(renderer, "the sync report is set but no visible textarea shows it");
  await shot("sync_report");
  // the report is display only: saving the workflow keeps exactly the schema's widget values (a stale
  // report saved with it would come back on reload and shift later values)
  res.saved_score_values = await page.evaluate(() => app.graph.serialize().nodes
    .find((n) => n.type === "AVSyncSyncScore").widgets_values);
  if (JSON.stringify(res.saved_score_values).length > 400 || /offset|AV-Align/i.test(JSON.stringify(res.saved_score_values)))
    fail(renderer, `the sync report is saved with the workflow: ${JSON.stringify(res.saved_score_values).slice(0, 200)}`);

  // 4. a user's mistake, queued from the UI: one line naming the input, shown without a traceback
  res.user_errors = {};
  const jobsApi = (await fetch(`${base}/api/jobs?limit=1`)).ok;
  const mistakes = {
    // a demix method that needs a model, with none connected
    demix_without_model: [["AVSyncAudioLoader", { audio_file: "avsync_example.wav", duration: 1.0 }],
                          ["AVSyncDemixer", { method: "bandit_v2" }], ["PreviewAudio", {}]],
    // a listed MTV transformer that is not in the model folder
    mtv_missing_file: [["AVSyncMTVLoader", { variant: "accm", transformer: "mtv_accm_bf16.safetensors" }],
                       ["AVSyncAudioLoader", { audio_file: "avsync_example.wav", duration: 1.0 }],
                       ["AVSyncMTVGenerator", { steps: 1 }], ["PreviewImage", {}]],
  };
  const expected = { demix_without_model: "demix_model: method 'bandit_v2' needs a demix model",
                     mtv_missing_file: "model file 'mtv_accm_bf16.safetensors' not found" };
  for (const [name, nodes] of Object.entries(mistakes)) {
    await page.evaluate((nodes) => {
      app.graph.clear();
      const made = nodes.map(([type, values], i) => {
        const n = LiteGraph.createNode(type);
        n.pos = [100 + 380 * (i % 3), 80 + 300 * Math.floor(i / 3)];
        app.graph.add(n);
        for (const [k, v] of Object.entries(values)) n.widgets.find((w) => w.name === k).value = v;
        return n;
      });
      // wire each node's inputs from the nearest earlier node with an output of the same type
      for (const [i, n] of made.entries()) for (const [slot, inp] of (n.inputs ?? []).entries()) {
        const src = made.slice(0, i).reverse().find((m) => (m.outputs ?? []).some((x) => x.type === inp.type));
        if (src && inp.link == null) src.connect(src.outputs.findIndex((x) => x.type === inp.type), n, slot);
      }
      app.canvas.setDirty(true, true);
    }, nodes);
    await page.waitForTimeout(800);
    await page.evaluate(() => app.queuePrompt(0, 1));
    const want = expected[name];
    const seen = await page.getByText(want).first().waitFor({ state: "visible", timeout: 30000 })
      .then(() => true).catch(() => false);
    await page.waitForTimeout(800);
    const visible = await page.evaluate(() => [...document.querySelectorAll(".p-dialog, [role=dialog], .p-toast")]
      .filter((d) => d.offsetParent !== null || d.getClientRects().length).map((d) => d.innerText).join("\n---\n"));
    res.user_errors[name] = { message_shown: seen, traceback_shown: /Traceback|File "/.test(visible),
                              dialog: visible.slice(0, 1500) };
    // frontend 1.58.1 files a run's error under its job / workflow; on ComfyUI 0.3.64 (no /api/jobs) it
    // showed no error at all for these runs (the message was in /history; cause inside the frontend not
    // established): a note there, a failure where the jobs API exists
    if (!seen && jobsApi) fail(renderer, `${name}: '${want}' not shown`);
    if (!seen && !jobsApi) (res.notes ??= []).push(`${name}: no error shown (this ComfyUI has no /api/jobs)`);
    if (res.user_errors[name].traceback_shown) fail(renderer, `${name}: a traceback is shown`);
    await shot(`error_${name}`);
    await dismissDialogs();
    await page.waitForTimeout(500);
  }

  res.errors = [...new Set(errors)];
  res.warnings = [...new Set(warnings)];
  const ours = (t) => /avsync/i.test(t);
  for (const e of res.errors.filter(ours)) fail(renderer, `error from AVSync: ${e}`);
  for (const w of res.warnings.filter(ours)) fail(renderer, `warning from AVSync: ${w}`);
  await page.close();
  return res;
}

try {
  for (const r of renderers) out[r] = await checkRenderer(r);
} finally {
  await api("POST", `/api/settings/${VUE_SETTING}`, savedSettings[VUE_SETTING] ?? false);
  await browser.close();
}
console.log(JSON.stringify(out, null, 1));
process.exitCode = out.failures.length ? 1 : 0;
