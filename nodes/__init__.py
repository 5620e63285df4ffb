"""ComfyUI node classes (V1 API): schema, validation, type conversion. No math.

Each node family lives in its own ``*_nodes.py`` module with its own
``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS``. Families are imported
one by one: if one fails (a missing optional dependency, a bug), the others still
register and the failure is logged with its cause.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import traceback

log = logging.getLogger("avsync")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
FAILED_FAMILIES: dict = {}  # module name -> formatted error, for `avsync info` and tests


def family_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_nodes"))


def _load_families() -> None:
    for name in family_modules():
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except Exception as err:  # one broken family must not take the others down
            FAILED_FAMILIES[name] = "".join(traceback.format_exception_only(type(err), err)).strip()
            log.error("AVSync: node family '%s' failed to import and is not registered: %s\n%s",
                      name, err, traceback.format_exc())
            continue
        for node_id, cls in getattr(mod, "NODE_CLASS_MAPPINGS", {}).items():
            if node_id in NODE_CLASS_MAPPINGS:
                log.error("AVSync: node id %s is defined twice (%s); keeping the first", node_id, name)
                continue
            NODE_CLASS_MAPPINGS[node_id] = cls
            NODE_DISPLAY_NAME_MAPPINGS[node_id] = getattr(mod, "NODE_DISPLAY_NAME_MAPPINGS", {}).get(node_id, node_id)


_load_families()
