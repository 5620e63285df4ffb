// AVSync: an upload button for AVSyncAudioLoader.
//
// ComfyUI's own audio upload widget (frontend "Comfy.UploadAudio") only attaches to an
// input literally named "audio" and expects the audio player that core nodes get, so a
// custom node cannot reuse it. This adds a plain button that uploads the chosen file
// into ComfyUI's input folder (the same /upload/image route core uses) and selects it in
// the node's `audio_file` list. The button is not serialized: saved workflows keep only
// the file name, as with core LoadAudio.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "AVSyncAudioLoader";
const FILE_WIDGET = "audio_file";
const ACCEPT = "audio/*,video/*,.wav,.flac,.mp3,.ogg,.oga,.opus,.m4a,.aac,.aif,.aiff,.mp4,.mov,.mkv,.webm";

async function uploadToInput(file) {
  const body = new FormData();
  body.append("image", file);
  const resp = await api.fetchApi("/upload/image", { method: "POST", body });
  if (resp.status !== 200) {
    throw new Error(`upload of ${file.name} failed: ${resp.status} ${resp.statusText}`);
  }
  const data = await resp.json();
  return data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
}

function selectFile(widget, path) {
  const values = widget.options.values;
  if (!values.includes(path)) values.unshift(path);
  widget.value = path;
  widget.callback?.(path);
}

app.registerExtension({
  name: "AVSync.AudioUpload",
  nodeCreated(node) {
    if (node.comfyClass !== NODE_CLASS) return;
    const fileWidget = node.widgets?.find((w) => w.name === FILE_WIDGET);
    if (!fileWidget) return;

    const input = document.createElement("input");
    input.type = "file";
    input.accept = ACCEPT;
    input.style.display = "none";
    input.dataset.avsyncUpload = String(node.id);
    input.addEventListener("change", async () => {
      const file = input.files?.[0];
      input.value = "";
      if (!file) return;
      try {
        selectFile(fileWidget, await uploadToInput(file));
        node.setDirtyCanvas?.(true, true);
      } catch (err) {
        console.error("AVSync:", err);
        alert(`AVSync: ${err.message}`);
      }
    });
    document.body.append(input);

    const button = node.addWidget("button", "upload", "", () => input.click(), { serialize: false });
    button.label = "choose audio file to upload";
    button.serialize = false; // LiteGraph reads this property (not the option) when saving widgets_values

    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
      input.remove();
      return onRemoved?.apply(this, arguments);
    };
  },
});
