// Check AVSync in ComfyUI's real frontend, in headless Chromium: the audio loader's upload
// button uploads into the input folder and selects the file; every UI example workflow
// loads with each saved value on the widget it belongs to. Prints JSON; writes
// screenshots (avsync_browser_*.png) to the current folder.
//
// Needs a running ComfyUI with this pack in custom_nodes, Debian's chromium, and
// playwright-core (npm install playwright-core; it downloads no browser).
import { chromium } from "playwright-core";
import fs from "fs";
import path from "path";
import { fileURLToPath } from "url";

// usage: node tools/browser_check.mjs [COMFYUI_URL] [COMFYUI_INPUT_DIR]
const base = process.argv[2] ?? "http://127.0.0.1:8188";
const inputDir = process.argv[3] ?? "ComfyUI/input";
const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const examples = path.join(repo, "example_workflows");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath: chromiumPath, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"] });
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
await page.goto(base);
await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
await page.waitForTimeout(3000);
const out = {};
// 1. the upload button on a fresh node
out.fresh = await page.evaluate(() => {
  app.graph.clear();
  const n = LiteGraph.createNode("AVSyncAudioLoader");
  n.pos = [100, 100];
  app.graph.add(n);
  return n.widgets.map((w) => [w.name, w.type, w.value, w.options?.serialize]);
});
const input = page.locator("input[data-avsync-upload]").last();
await input.setInputFiles(path.join(examples, "avsync_example.wav"));
await page.waitForTimeout(2000);
out.after_upload = await page.evaluate(() => {
  const n = app.graph._nodes.find((x) => x.comfyClass === "AVSyncAudioLoader");
  return n.widgets.find((w) => w.name === "audio_file").value;
});
out.uploaded_file_exists = fs.existsSync(path.join(inputDir, out.after_upload));
out.serialized = await page.evaluate(() => app.graph.serialize().nodes.map((n) => [n.type, n.widgets_values]));
await page.screenshot({ path: "avsync_browser_fresh_node.png" });
// 2. every UI example workflow: widget values land on the right widgets
out.workflows = {};
for (const f of fs.readdirSync(examples).filter((x) => x.endsWith(".json"))) {
  const wf = JSON.parse(fs.readFileSync(path.join(examples, f)));
  out.workflows[f] = await page.evaluate(async (wf) => {
    await app.loadGraphData(wf);
    return app.graph._nodes.filter((n) => n.comfyClass.startsWith("AVSync")).map((n) =>
      [n.id, n.comfyClass, Object.fromEntries(n.widgets.filter((w) => w.type !== "button").map((w) => [w.name, w.value]))]);
  }, wf);
  await page.screenshot({ path: "avsync_browser_" + f.replace(".json", ".png") });
}
out.errors = errors;
console.log(JSON.stringify(out, null, 1));
await browser.close();
