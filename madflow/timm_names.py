"""Is an architecture name one timm knows? Answered at workflow parse time, before any slide
is tiled, without importing timm (which imports torch: seconds per parse).

timm registers every architecture with an `@register_model` decorator on a function of that
name in `timm/models/*.py`; reading those sources finds the registered names in ~0.1 s. A
name not found there is asked of timm itself (`timm.is_model`), so a rare miss of the source
scan costs time, never a wrong answer."""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

_REGISTERED = re.compile(r"^@register_model\s*\n\s*def\s+(\w+)\s*\(", re.M)


@lru_cache(maxsize=1)
def _registered_in_sources() -> frozenset[str]:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    return frozenset(name for f in models.glob("*.py") for name in _REGISTERED.findall(f.read_text()))


def is_timm_model(name: str) -> bool:
    """True if timm can build `name` (a pretrained tag such as `.augreg_in21k` allowed)."""
    if name.split(".", 1)[0] in _registered_in_sources():
        return True
    import timm

    return timm.is_model(name)


def unknown_archs(config: dict) -> list[str]:
    """'<config key>: <name>' for every architecture in the config that timm does not know."""
    named = [("model.arch", (config.get("model") or {}).get("arch"))]
    for exp, settings in (config.get("experiments") or {}).items():
        named.append((f"experiments.{exp}.arch", settings.get("arch")))
        named.append((f"experiments.{exp}.model.arch", (settings.get("model") or {}).get("arch")))
    return [f"{key}: {name!r}" for key, name in named if name and not is_timm_model(name)]
