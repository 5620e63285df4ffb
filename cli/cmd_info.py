"""``avsync info``: version, nodes, model folders and the model files found."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="show the version, the nodes, the model folders and which model files were found")
    p.add_argument("--json", action="store_true", help="print the same information as JSON")
    p.set_defaults(func=run)


def collect() -> dict:
    from .. import __version__, compat
    from ..loaders import model_files
    from ..nodes import FAILED_FAMILIES, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    loader_errors = _import_loaders()
    folders = {}
    for name in sorted(set(compat.AVSYNC_MODEL_FOLDERS) | {s.folder for s in model_files.MODEL_FILES.values()}):
        folders[name] = [str(p) for p in compat.model_folder_paths(name)]
    files = []
    for spec in model_files.MODEL_FILES.values():
        path = compat.find_model_file(spec.folder, spec.filename)
        files.append({"key": spec.key, "file": spec.filename, "folder": spec.folder,
                      "found": str(path) if path else None, "source": spec.source})
    return {
        "version": __version__,
        "nodes": {k: NODE_DISPLAY_NAME_MAPPINGS.get(k, k) for k in sorted(NODE_CLASS_MAPPINGS)},
        "failed_node_families": dict(FAILED_FAMILIES),
        "failed_loaders": loader_errors,
        "models_dir": str(compat.models_dir()),
        "model_folders": folders,
        "model_files": files,
    }


def _import_loaders() -> dict:
    """Loader modules register their model files on import; returns the ones that failed."""
    import importlib
    import pkgutil

    from .. import loaders

    errors = {}
    for m in pkgutil.iter_modules(loaders.__path__):
        try:
            importlib.import_module(f".{m.name}", loaders.__name__)
        except Exception as err:  # info must still print; the failure is shown, not hidden
            errors[m.name] = f"{type(err).__name__}: {err}"
    return errors


def run(args) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    print(f"AVSync {info['version']}")
    print(f"\nNodes ({len(info['nodes'])}):")
    for node_id, name in info["nodes"].items():
        print(f"  {node_id:36s} {name}")
    for fam, err in info["failed_node_families"].items():
        print(f"  !! node family {fam} failed to import: {err}")
    for mod, err in info["failed_loaders"].items():
        print(f"  !! loader module {mod} failed to import: {err}")
    print(f"\nModels directory: {info['models_dir']}")
    print("Model folders:")
    for name, paths in info["model_folders"].items():
        print(f"  {name:22s} {', '.join(paths)}")
    print("Model files:")
    if not info["model_files"]:
        print("  (none registered)")
    for f in info["model_files"]:
        state = f"found: {f['found']}" if f["found"] else f"missing (get it from: {f['source']})"
        print(f"  {f['file']:44s} [{f['folder']}] {state}")
    return 0
