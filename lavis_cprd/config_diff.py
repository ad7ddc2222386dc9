"""How two configs differ, key by key: what a resume warns about and what decides whether
``compare``/``demo`` reuse a finished run."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Tuple

SHOWN = 8  # differences a message lists

Difference = Tuple[str, Any, Any]  # (dotted key, old value, new value)


def flatten(config: Mapping, prefix: str = "") -> Dict[str, Any]:
    """``{"run": {"seed": 1}}`` -> ``{"run.seed": 1}`` (lists and empty mappings are values)."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: Mapping, new: Mapping, ignore: Iterable[str] = ()) -> List[Difference]:
    """The dotted keys whose values differ between two configs (nested or already flat; a key
    one of them lacks is ``None`` there), sorted, leaving out ``ignore``."""
    a, b, ignore = flatten(old), flatten(new), set(ignore)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)]


def describe(differences: List[Difference], shown: int = SHOWN) -> str:
    """``run.seed: 0 -> 1, model.distill.loss: 'kl' -> 'cprd' and 3 more`` (hashes shortened)."""
    def value(v: Any) -> str:
        return v[:19] + "..." if isinstance(v, str) and v.startswith("sha256:") else repr(v)

    listed = ", ".join(f"{k}: {value(old)} -> {value(new)}" for k, old, new in differences[:shown])
    return listed + (f" and {len(differences) - shown} more" if len(differences) > shown else "")
