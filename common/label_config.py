"""What a Label Studio labelling config asks for: the image key and its `Choices` tags."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass


class LabelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ChoicesTag:
    name: str
    to_name: str
    labels: tuple[str, ...]
    multiple: bool


@dataclass(frozen=True)
class LabelConfig:
    image_name: str
    image_key: str
    choices: tuple[ChoicesTag, ...]
    fingerprint: str

    def tag(self, name: str) -> ChoicesTag | None:
        return next((t for t in self.choices if t.name == name), None)


def parse_label_config(xml: str) -> LabelConfig:
    """Parse the config; only `Choices` tags that point at an `Image` tag are predicted."""
    if not xml or not xml.strip():
        raise LabelConfigError("empty label config")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc
    images = {
        el.get("name"): (el.get("value") or "").lstrip("$")
        for el in root.iter()
        if el.tag == "Image" and el.get("name") and el.get("value")
    }
    if not images:
        raise LabelConfigError("label config has no <Image name=... value=$...> tag")
    tags = []
    for el in root.iter():
        if el.tag != "Choices":
            continue
        to_name = el.get("toName", "")
        if to_name not in images or not el.get("name"):
            continue
        labels = tuple(c.get("value") for c in el.iter() if c.tag == "Choice" and c.get("value"))
        if labels:
            tags.append(
                ChoicesTag(
                    name=el.get("name", ""),
                    to_name=to_name,
                    labels=labels,
                    multiple=el.get("choice", "single").lower() == "multiple",
                )
            )
    image_name = tags[0].to_name if tags else next(iter(images))
    return LabelConfig(
        image_name=image_name,
        image_key=images[image_name],
        choices=tuple(tags),
        fingerprint=hashlib.sha256(xml.encode()).hexdigest()[:16],
    )
