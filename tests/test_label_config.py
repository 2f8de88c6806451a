"""The labelling config of the real project, and annotation results filtered against it."""

from __future__ import annotations

import logging

import pytest

from common.annotations import annotation_labels, labels_from_result
from common.label_config import LabelConfigError, parse_label_config
from tests.helpers import LABEL_CONFIG


@pytest.fixture(scope="module")
def config():
    return parse_label_config(LABEL_CONFIG)


def choice(tag: str, *labels: str) -> dict:
    return {"from_name": tag, "to_name": "image", "type": "choices", "value": {"choices": list(labels)}}


def test_real_config_has_four_choices_tags(config):
    assert config.image_name == "image"
    assert config.image_key == "image"
    assert [(t.name, t.multiple) for t in config.choices] == [
        ("organism_type", False),
        ("morphology", True),
        ("life_form", False),
        ("shape", True),
    ]
    assert all(t.to_name == "image" for t in config.choices)
    assert config.tag("organism_type").labels == ("Not-plankton", "Plankton", "Debris")
    assert config.tag("shape").labels == ("Spiky", "Round", "Rod-like")
    assert len(config.tag("morphology").labels) == 9
    assert "Theca/test/exoskeletal structures" in config.tag("morphology").labels
    assert config.tag("ta") is None  # the TextArea is not a Choices tag
    assert config.tag("nope") is None


def test_fingerprint_follows_the_text(config):
    assert parse_label_config(LABEL_CONFIG).fingerprint == config.fingerprint
    changed = LABEL_CONFIG.replace('<Choice value="Debris"/>', '<Choice value="Detritus"/>')
    assert parse_label_config(changed).fingerprint != config.fingerprint


def test_image_key_strips_dollar():
    xml = '<View><Image name="img" value="$url"/><Choices name="c" toName="img"><Choice value="A"/></Choices></View>'
    cfg = parse_label_config(xml)
    assert (cfg.image_name, cfg.image_key) == ("img", "url")
    assert cfg.choices[0].multiple is False


def test_choices_pointing_elsewhere_are_ignored():
    xml = (
        '<View><Image name="img" value="$image"/><Text name="txt" value="$text"/>'
        '<Choices name="on_text" toName="txt"><Choice value="A"/></Choices>'
        '<Choices name="on_image" toName="img" choice="multiple"><Choice value="B"/></Choices></View>'
    )
    cfg = parse_label_config(xml)
    assert [t.name for t in cfg.choices] == ["on_image"]


@pytest.mark.parametrize(
    "xml",
    [
        "",
        "   ",
        "<View><Image name='image' value='$image'>",  # not closed
        "not xml at all",
        '<View><Choices name="c" toName="image"><Choice value="A"/></Choices></View>',  # no Image
        '<View><Image name="image"/></View>',  # Image without value
    ],
)
def test_invalid_configs_raise(xml):
    with pytest.raises(LabelConfigError):
        parse_label_config(xml)


def test_invalid_xml_message():
    with pytest.raises(LabelConfigError, match="not valid XML"):
        parse_label_config("<View><Image")
    with pytest.raises(LabelConfigError, match="no <Image"):
        parse_label_config("<View><Text name='t' value='$t'/></View>")


def test_labels_from_result_keeps_known(config):
    result = [choice("organism_type", "Plankton"), choice("shape", "Round", "Spiky")]
    assert labels_from_result(result, config) == {"organism_type": ["Plankton"], "shape": ["Round", "Spiky"]}


def test_unknown_tag_dropped(config, caplog):
    with caplog.at_level(logging.WARNING):
        labels = labels_from_result([choice("colour", "Green"), choice("life_form", "Colony")], config)
    assert labels == {"life_form": ["Colony"]}
    assert "colour" in caplog.text


def test_unknown_labels_dropped(config):
    labels = labels_from_result([choice("shape", "Round", "Square"), choice("organism_type", "Alien")], config)
    assert labels == {"shape": ["Round"]}


def test_non_choices_items_and_bad_values_ignored(config):
    result = [
        {"from_name": "ta", "to_name": "image", "type": "textarea", "value": {"text": ["Daphnia"]}},
        {"from_name": "shape", "type": "choices", "value": {"choices": "Round"}},  # not a list
        {"from_name": "shape", "type": "choices"},
        "garbage",
        choice("morphology", "Eggs"),
    ]
    assert labels_from_result(result, config) == {"morphology": ["Eggs"]}
    assert labels_from_result(None, config) == {}


def test_single_choice_keeps_one_label(config):
    labels = labels_from_result([choice("organism_type", "Debris", "Plankton")], config)
    assert labels == {"organism_type": ["Debris"]}
    # An unknown label first does not make the single choice empty.
    labels = labels_from_result([choice("life_form", "Blob", "Filament", "Colony")], config)
    assert labels == {"life_form": ["Filament"]}


def test_multiple_choice_keeps_all(config):
    labels = labels_from_result([choice("morphology", "Flagella", "Cilia", "Mucilage")], config)
    assert labels == {"morphology": ["Cilia", "Flagella", "Mucilage"]}


def test_cancelled_annotation_counts_for_nothing(config):
    ann = {"was_cancelled": True, "result": [choice("organism_type", "Plankton")]}
    assert annotation_labels(ann, config) is None  # skipped: not an annotation at all
    ann["was_cancelled"] = False
    assert annotation_labels(ann, config) == {"organism_type": ["Plankton"]}
    assert annotation_labels({"result": None}, config) == {}  # annotated, teaching no tag
    for odd in (3, True, "x", {"a": 1}):
        assert annotation_labels({"result": odd}, config) == {}
