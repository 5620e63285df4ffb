// AVSync: show AVSyncSyncScore's report on the node.
//
// The node returns {"ui": {"text": [report]}, "result": ...}. ComfyUI's frontend shows
// ui.images and ui.audio on any node but has no display of its own for ui.text, so this
// adds one read-only multiline text widget and fills it when the node has run. The widget
// is not serialized: saved workflows keep only the node's real widget values.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE_CLASS = "AVSyncSyncScore";
const REPORT_WIDGET = "sync_report";

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, REPORT_WIDGET, ["STRING", { multiline: true }], app).widget;
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
    if (nodeData.name !== NODE_CLASS) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? message.text.join("\n") : String(message?.text ?? "");
      reportWidget(this).value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
