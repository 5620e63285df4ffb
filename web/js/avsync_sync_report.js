// AVSync: show a node's text report on the node — AVSyncSyncScore's sync report; the audio
// layers of the model for the KeyVID loaders and AVSyncAudioSyncGuidanceModel.
//
// These nodes return {"ui": {"text": [report]}, "result": ...}. ComfyUI's frontend shows
// ui.images and ui.audio on any node but has no display of its own for ui.text, so this
// adds one read-only text area (a DOM widget, `node.addDOMWidget`: the extension API that
// both the LiteGraph canvas and the Vue "Nodes 2.0" renderer draw) and fills it when the
// node has run. It does not import `scripts/widgets.js` (newer frontends warn that it is
// internal and may break) nor read `widget.inputEl` (deprecated for `widget.element`).
// The widget is not serialized: saved workflows keep only the node's real widget values.
import { app } from "../../scripts/app.js";

const REPORT_MIN_HEIGHT = 110; // px: the report's 5-7 lines scroll inside this
const TEXT_WIDGETS = {
  AVSyncSyncScore: "sync_report",
  AVSyncKeyVIDGeneratorLoader: "audio_layers",
  AVSyncKeyVIDInterpolatorLoader: "audio_layers",
  AVSyncAudioSyncGuidanceModel: "audio_layers",
};

function reportWidget(node, name) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.spellcheck = false;
    area.className = "comfy-multiline-input"; // the frontend's own style for text areas on nodes
    area.style.opacity = 0.8;
    area.placeholder = "(filled in after a run)";
    widget = node.addDOMWidget(name, "avsync_text", area, {
      getValue: () => area.value,
      setValue: (v) => { area.value = v; },
      getMinHeight: () => REPORT_MIN_HEIGHT,
      serialize: false,
    });
    widget.serialize = false; // LiteGraph reads this property when saving widgets_values
    // grow the node so the whole report is readable without resizing by hand
    const [w, h] = node.computeSize();
    node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  }
  return widget;
}

app.registerExtension({
  name: "AVSync.SyncReportText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = TEXT_WIDGETS[nodeData.name];
    if (!name) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? message.text.join("\n") : String(message?.text ?? "");
      reportWidget(this, name).value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
