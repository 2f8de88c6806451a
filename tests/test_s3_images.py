"""`s3://bucket/key` images through an S3-compatible endpoint (S3_ENDPOINT_URL).

No real S3 or MinIO can run here, so the endpoint is moto's S3 server on loopback: a fake, spoken to
over real HTTP with boto3, exactly as the worker speaks to MinIO or AWS.
"""

from __future__ import annotations

import dataclasses

import boto3
import pytest
from moto.server import ThreadedMotoServer

from common.settings import Settings
from tests.helpers import DATA, free_port
from worker.images import ImageError, ImageFetcher, decode_image


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def fetcher(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="flowcam")
    crop = sorted((DATA / "flowcam" / "crops").glob("*.tif"))[0]
    s3.put_object(Bucket="flowcam", Key="sample-1/crop.tif", Body=crop.read_bytes())
    s3.put_object(Bucket="flowcam", Key="big.bin", Body=b"x" * 1_100_000)
    settings = dataclasses.replace(Settings(), s3_endpoint_url=s3_endpoint, image_max_bytes=1_000_000)
    return ImageFetcher(settings), crop


def test_s3_image_is_fetched_through_the_configured_endpoint(fetcher):
    fetch, crop = fetcher
    data = fetch.fetch("s3://flowcam/sample-1/crop.tif")
    assert data == crop.read_bytes()
    assert decode_image(data, 10**7).mode == "RGB"


@pytest.mark.parametrize(
    ("ref", "message"),
    [("s3://flowcam/missing.tif", "cannot read s3://flowcam/missing.tif"), ("s3://flowcam/big.bin", "IMAGE_MAX_BYTES"),
     ("s3://flowcam", "not s3://bucket/key"), ("s3://nobucket/x.tif", "cannot read")],
)  # fmt: skip
def test_s3_errors_name_the_object(fetcher, ref, message):
    fetch, _ = fetcher
    with pytest.raises(ImageError, match=message):
        fetch.fetch(ref)
