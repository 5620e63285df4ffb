// AVSync: show a node's text report on the node — AVSyncSyncScore's sync report; the audio
// layers of the model for the KeyVID loaders and AVSyncAudioSyncGuidanceModel.
//
// These nodes return {"ui": {"text": [report]}, "result": ...}. ComfyUI's frontend shows
// ui.images and ui.audio on any node but has no display of its own for ui.text, so this
// adds one read-only multiline text widget and fills it when the node has run. The widget
// is not serialized: saved workflows keep only the node's real widget values.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const TEXT_WIDGETS = {
  AVSyncSyncScore: "sync_report",
  AVSyncKeyVIDGeneratorLoader: "audio_layers",
  AVSyncKeyVIDInterpolatorLoader: "audio_layers",
  AVSyncAudioSyncGuidanceModel: "audio_layers",
};

function reportWidget(node, name) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, name, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // LiteGraph reads this property when saving widgets_values
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.8;
    }
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
