"""What a Label Studio labelling config asks for: the image key and its `Choices` tags."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# What a label config may hold (README "Security"). Label Studio's configs are a few KB; a taxonomy of a few
# thousand species fits. Larger ones would be parsed on every webhook and stored in Redis per project.
MAX_CONFIG_BYTES = 512 * 1024
MAX_CHOICES_TAGS = 100
MAX_LABELS_PER_TAG = 5_000
MAX_LABEL_CHARS = 500


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
    if not isinstance(xml, str):
        raise LabelConfigError("label config must be XML text")
    if not xml or not xml.strip():
        raise LabelConfigError("empty label config")
    size = len(xml.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise LabelConfigError(f"label config is {size} bytes; at most {MAX_CONFIG_BYTES} are accepted")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise LabelConfigError("label config must not declare a DOCTYPE or entities")
    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError) as exc:  # ValueError: text Expat cannot take (a lone surrogate, ...)
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
        if len(labels) > MAX_LABELS_PER_TAG:
            raise LabelConfigError(
                f"<Choices name={el.get('name')[:40]!r}> has {len(labels)} choices; at most {MAX_LABELS_PER_TAG}"
            )
        long = next((label for label in labels if len(label) > MAX_LABEL_CHARS), None)
        if long is not None:
            raise LabelConfigError(
                f"<Choices name={el.get('name')[:40]!r}> has a choice of {len(long)} characters; at most "
                f"{MAX_LABEL_CHARS}"
            )
        if labels:
            tags.append(
                ChoicesTag(
                    name=el.get("name", ""),
                    to_name=to_name,
                    labels=labels,
                    multiple=el.get("choice", "single").lower() == "multiple",
                )
            )
        if len(tags) > MAX_CHOICES_TAGS:
            raise LabelConfigError(f"label config has more than {MAX_CHOICES_TAGS} <Choices> tags")
    image_name = tags[0].to_name if tags else next(iter(images))
    return LabelConfig(
        image_name=image_name,
        image_key=images[image_name],
        choices=tuple(tags),
        fingerprint=hashlib.sha256(xml.encode()).hexdigest()[:16],
    )
