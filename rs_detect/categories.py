"""What each model class *is*: a ``plane``, a ``ship`` or ``other``, whatever the model calls it.

Users bring detectors trained on many datasets, each with its own class names: DOTA says ``plane`` and
``ship``, COCO ``airplane`` and ``boat``, xView ``Fixed-wing Aircraft`` and ``Maritime Vessel``, FAIR1M
``Boeing737`` and ``Fishing Boat``. rs-detect maps every class name to a *category* through the table
below, so the default ``--classes plane,ship`` works with all of them, and each detection carries both
the model's ``class_name`` and its ``category``.

Names are compared case- and punctuation-insensitively: ``Fixed-wing Aircraft``, ``fixed_wing_aircraft``
and ``FixedWingAircraft`` are one name. A model YAML can override the table per class::

    categories:
      Helicopter: plane
      Barge: other

Helicopters are ``other`` by default: DOTA and xView keep them apart from planes, and their footprint
and surroundings (helipads, decks, rooftops) are not those of fixed-wing aircraft. Give them ``plane``
in the model YAML to count them as planes.

Selecting classes (``--classes``, ``exclusive_classes``): each entry is a category (every class of it),
or a model class name (that class), or ``all``. See :func:`select`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence

from rs_detect.errors import ConfigError

log = logging.getLogger(__name__)

PLANE, SHIP, OTHER = "plane", "ship", "other"
CATEGORIES = (PLANE, SHIP, OTHER)
#: the default selection: every class whose category is plane or ship
DEFAULT_SELECTION = (PLANE, SHIP)

_PLANE_NAMES = (
    # generic and DOTA / DIOR / COCO / NWPU / RarePlanes
    "plane", "planes", "airplane", "airplanes", "aeroplane", "aircraft", "aircrafts", "airliner", "jet",
    "fixed-wing aircraft", "fixed wing", "fixed-wing", "civil aircraft", "military aircraft",
    "large aircraft", "small aircraft", "medium aircraft", "other-airplane", "other airplane", "other aircraft",
    # xView
    "cargo plane", "small aircraft", "passenger/cargo plane", "passenger plane", "passenger aircraft",
    "cargo aircraft", "passenger/cargo aircraft",
    # FAIR1M
    "boeing737", "boeing747", "boeing777", "boeing787", "c919", "a220", "a321", "a330", "a350", "arj21",
)
_SHIP_NAMES = (
    # generic and DOTA / DIOR / COCO / HRSC / ShipRSImageNet
    "ship", "ships", "boat", "boats", "vessel", "vessels", "maritime vessel", "watercraft",
    "motorboat", "motor boat", "speedboat", "speed boat", "sailboat", "sail boat", "sailing boat", "sailing ship",
    "tugboat", "tug", "barge", "ferry", "yacht", "fishing vessel", "fishing boat", "container ship",
    "oil tanker", "tanker", "cargo ship", "bulk carrier", "cruise ship",
    "passenger ship", "warship", "war ship", "aircraft carrier", "destroyer", "frigate", "cruiser",
    "submarine", "landing ship", "patrol boat", "hovercraft", "other-ship", "other ship", "other vessel",
    # FAIR1M
    "engineering ship", "liquid cargo ship", "dry cargo ship",
    # xView
    "reach stacker ship", "fishing vessel", "container vessel",
)
# families named by model number (FAIR1M's Boeing737, A321...): Boeing and Airbus airliners
_PLANE_PATTERNS = (re.compile(r"^boeing\d{3}\w*$"), re.compile(r"^a3[0-9]{2}(neo)?$"), re.compile(r"^a2[0-9]{2}$"))


def normalize(name: str) -> str:
    """The comparison key of a class name: lower case, letters and digits only."""
    return re.sub(r"[^0-9a-z]+", "", str(name).lower())


#: the alias table, by normalized name
ALIASES: dict[str, str] = {normalize(n): SHIP for n in _SHIP_NAMES}
ALIASES.update({normalize(n): PLANE for n in _PLANE_NAMES if normalize(n) not in ALIASES})
ALIASES[normalize("helicopter")] = OTHER  # see the module docstring


def category_of(name: str, overrides: Mapping[str, str] | None = None) -> str:
    """The category of one class name: the model YAML's ``categories`` first, then the table, else other."""
    key = normalize(name)
    for cls, cat in (overrides or {}).items():
        if normalize(cls) == key:
            return cat
    if key in ALIASES:
        return ALIASES[key]
    if any(p.match(key) for p in _PLANE_PATTERNS):
        return PLANE
    return OTHER


def check_overrides(overrides: Mapping[str, str], names: Sequence[str], where: str) -> None:
    """Refuse a ``categories:`` entry for a class the model does not have, or an unknown category."""
    keys = {normalize(n) for n in names}
    for cls, cat in overrides.items():
        if cat not in CATEGORIES:
            raise ConfigError(f"{where}: categories[{cls}] must be one of {', '.join(CATEGORIES)}, got {cat!r}")
        if normalize(cls) not in keys:
            raise ConfigError(f"{where}: categories: the model has no class {cls!r} (model classes: {', '.join(names)})")


def categories_for(names: Sequence[str], overrides: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The category of each model class, in model order."""
    return tuple(category_of(n, overrides) for n in names)


def select(
    requested: Iterable[str] | None,
    names: Sequence[str],
    categories: Sequence[str],
    what: str = "--classes",
    strict: bool = True,
) -> tuple[int, ...] | None:
    """Model class ids that ``requested`` selects, or None for every class.

    Each entry is ``all`` (every class), a category (``plane``, ``ship``, ``other``: every class of it)
    or a model class name (case and punctuation ignored). ``strict``: an entry that is neither is an
    error, and so is a selection that ends up empty, except for the default ``plane,ship``: a model
    with neither gets a warning and keeps every class. Not strict (``exclusive_classes``): entries
    the model does not have are ignored.
    """
    tokens = [str(t).strip() for t in (requested or ()) if str(t).strip()]
    if not tokens or any(t.lower() == "all" for t in tokens):
        return None
    keys = [normalize(n) for n in names]
    chosen: set[int] = set()
    for token in tokens:
        key = normalize(token)
        hit = {i for i, k in enumerate(keys) if k == key}
        if token.lower() in CATEGORIES:
            hit |= {i for i, c in enumerate(categories) if c == token.lower()}
        elif not hit and strict:
            raise ConfigError(
                f"{what}: the model has no class {token!r} (model classes: {', '.join(names)}; "
                f"categories: {', '.join(CATEGORIES)}; or all)"
            )
        chosen |= hit
    if chosen or not strict:
        return tuple(sorted(chosen))
    if {t.lower() for t in tokens} == set(DEFAULT_SELECTION):
        log.warning("the model has no plane or ship class (classes: %s): keeping every class; "
                    "name the classes to keep with --classes, or map them in the model YAML's categories:", ", ".join(names))
        return None
    raise ConfigError(f"{what}: no model class is a {' or '.join(tokens)} (model classes: {', '.join(names)})")
