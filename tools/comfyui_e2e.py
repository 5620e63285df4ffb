"""Run AVSync's API-format workflows against a running ComfyUI, as a user would.

Not part of the test suite (CI has no ComfyUI). Usage, with ComfyUI started with this
pack in its custom_nodes folder (e.g. ``python main.py --cpu --port 8199``)::

    python tools/comfyui_e2e.py --url http://127.0.0.1:8199 --input-dir ComfyUI/input \
        example_workflows/api/avsync_load_audio.json tools/e2e/loader_to_video.json

``--tiny-models ComfyUI/models`` first writes tiny random-weight models (the test
factories') where ``tools/e2e/*_tiny_models.json`` expect them, so workflows that need
model files run end to end without real weights (the output is noise, the wiring is real):
a tiny SVD-XT + backward ΔW, and tiny KeyVID generator + interpolator files converted by
``avsync convert keyvid``'s code into ``models/avsync/keyvid`` (tests/factories/keyvid_files.py), and
tiny MTV files (tests/factories/mtv_pipeline_files.py).

It copies the example inputs into ComfyUI's input folder, posts
each workflow to ``/prompt``, waits for it in ``/history`` and prints what each output
node produced (files, with their sizes). Exit code 1 if any workflow failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _post(url: str, data: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        return {"http_error": err.code, "body": json.loads(err.read() or b"{}")}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def run_workflow(base: str, path: Path, timeout: float) -> tuple[bool, dict]:
    prompt = json.loads(path.read_text())
    res = _post(f"{base}/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    if "prompt_id" not in res:
        return False, res
    pid = res["prompt_id"]
    t0 = time.time()
    while time.time() - t0 < timeout:
        hist = _get(f"{base}/history/{pid}")
        if pid in hist:
            entry = hist[pid]
            ok = entry.get("status", {}).get("status_str") == "success"
            return ok, entry
        time.sleep(0.5)
    return False, {"error": f"timed out after {timeout} s"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflows", nargs="+", type=Path)
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--input-dir", type=Path, help="ComfyUI's input folder (the example wav is copied there)")
    ap.add_argument("--output-dir", type=Path, help="ComfyUI's output folder (to report file sizes)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--tiny-models", type=Path, metavar="MODELS_DIR",
                    help="write tiny random-weight models into this ComfyUI models folder first")
    args = ap.parse_args(argv)
    if args.input_dir:
        for name in ("avsync_example.wav", "avsync_inbetween_first.png", "avsync_inbetween_last.png",
                     "movie_hello_512x288.mp4"):
            shutil.copy(ROOT / "example_workflows" / name, args.input_dir / name)
    if args.tiny_models:
        sys.path.insert(0, str(ROOT))
        from tests.factories.svd import save_tiny_backward_delta, save_tiny_svd_single_file

        save_tiny_svd_single_file(args.tiny_models / "checkpoints" / "avsync_tiny_svd.safetensors")
        save_tiny_backward_delta(args.tiny_models / "avsync" / "svd_backward" / "avsync_tiny_delta.safetensors")
        # KeyVID generator + interpolator, converted by the real converter into models/avsync/keyvid
        # (default file names); inside ComfyUI the prompt tokenizer is ComfyUI's own comfy/sd1_tokenizer
        from tests.factories.keyvid_files import write_tiny_keyvid_models

        write_tiny_keyvid_models(args.tiny_models)
        # MTV: transformer converted into models/avsync/mtv, VAE, T5 (+ its tokenizer), wav2vec2 folders
        from tests.factories.mtv_pipeline_files import write_tiny_mtv_models

        write_tiny_mtv_models(args.tiny_models)
    failed = 0
    for wf in args.workflows:
        ok, entry = run_workflow(args.url.rstrip("/"), wf, args.timeout)
        print(f"{'OK  ' if ok else 'FAIL'} {wf}")
        if not ok:
            failed += 1
            print(json.dumps(entry, indent=2)[:4000])
            continue
        for node_id, out in entry.get("outputs", {}).items():
            for kind, items in out.items():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        size = ""
                        if args.output_dir and item.get("type") == "output":
                            p = args.output_dir / item.get("subfolder", "") / item["filename"]
                            size = f" {p.stat().st_size} bytes" if p.exists() else " (missing!)"
                        print(f"     node {node_id} {kind}: {item.get('subfolder', '')}/{item['filename']} "
                              f"[{item.get('type')}]{size}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
