from __future__ import annotations

import pytest

from common.collections import collection_of


@pytest.mark.parametrize(
    ("ref", "collection"),
    [
        ("s3://plankton-2021/run-3/img_001.png", "s3://plankton-2021"),
        ("gs://bucket/x.tif", "gs://bucket"),
        ("/data/upload/12/abc-img.png", "upload:12"),
        ("/data/local-files/?d=flowcam/crops/x.tif", "local-files:flowcam"),
        ("https://cdn.example.org/sampleA/x.png", "https://cdn.example.org/sampleA"),
        ("https://cdn.example.org/x.png", "https://cdn.example.org"),
        ("", ""),
    ],
)
def test_collection_of(ref: str, collection: str):
    assert collection_of(ref) == collection
