"""The labelling interface: the label config generated from the class list, and results in its shape."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

from flywheel.errors import ConfigError

FROM_NAME, TO_NAME = "label", "image"
LabelMode = Literal["single", "multi"]
_CHOICE = {"single": "single", "multi": "multiple"}


def label_config(classes: Sequence[str], *, mode: LabelMode = "single", instructions: str = "") -> str:
    """One image and the classes as Choices (one, or any number in multi mode), XML-escaped; the
    instructions, when given, sit above the image."""
    if not classes:
        raise ConfigError("cannot build a Label Studio config without classes (the catalog has none yet)")
    if mode not in _CHOICE:
        raise ConfigError(f"label_studio.label_mode must be one of: {', '.join(_CHOICE)}; got {mode!r}")
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    header = f"  <Header value={quoteattr(instructions)}/>\n" if instructions else ""
    return (
        "<View>\n"
        f"{header}"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="{_CHOICE[mode]}" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>"
    )


def _label_choices(config: str) -> ET.Element | None:
    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return None
    return next((c for c in root.iter("Choices") if c.get("name") == FROM_NAME), None)


def config_classes(config: str) -> list[str]:
    """The Choice values of the `label` Choices tag of a label config (empty when there is none)."""
    choices = _label_choices(config)
    return [] if choices is None else [c.get("value", "") for c in choices.iter("Choice")]


def config_mode(config: str) -> LabelMode | None:
    """single or multi, as the config's `label` Choices tag says (None when there is none)."""
    choices = _label_choices(config)
    if choices is None:
        return None
    return "multi" if choices.get("choice") == "multiple" else "single"


def choice_result(*labels: str) -> list[dict[str, Any]]:
    """An annotation or prediction result choosing `labels` (one in single mode)."""
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": list(labels)}}]


def result_choices(result: Sequence[dict[str, Any]] | None) -> list[str]:
    """The classes chosen in an annotation's result (empty when it chose none)."""
    for region in result or []:
        if region.get("from_name") == FROM_NAME and region.get("type") == "choices":
            return list((region.get("value") or {}).get("choices") or [])
    return []
