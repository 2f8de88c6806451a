"""`s3://bucket/key` images through an S3-compatible endpoint (S3_ENDPOINT_URL).

No real S3 or MinIO can run here, so the endpoint is moto's S3 server on loopback: a fake, spoken to
over real HTTP with boto3, exactly as the worker speaks to MinIO or AWS.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from moto.server import ThreadedMotoServer

from common.settings import Settings
from tests.helpers import DATA, free_port
from tests.servers import redirect, running
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


def test_missing_object_is_not_transient_and_unreachable_endpoint_is(fetcher, monkeypatch):
    fetch, _ = fetcher
    with pytest.raises(ImageError, match="NoSuchKey") as exc:
        fetch.fetch("s3://flowcam/missing.tif")
    assert not exc.value.transient
    dead = dataclasses.replace(fetch.settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}", download_timeout=2)
    with pytest.raises(ImageError, match="cannot read s3://flowcam/sample-1/crop.tif") as exc:
        ImageFetcher(dead).fetch("s3://flowcam/sample-1/crop.tif")
    assert exc.value.transient


def test_label_studio_presigned_urls_are_followed_to_the_s3_endpoint(fetcher, s3_endpoint):
    """Label Studio's /tasks/<id>/presign/ answers with a redirect to a presigned URL on the S3 endpoint:
    followed (the endpoint is allowed because S3_ENDPOINT_URL names it), without Label Studio's key, and
    the signature never shows in a message."""
    fetch, crop = fetcher
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    good = s3.generate_presigned_url("get_object", Params={"Bucket": "flowcam", "Key": "sample-1/crop.tif"})
    gone = s3.generate_presigned_url("get_object", Params={"Bucket": "flowcam", "Key": "gone.tif"})
    with running() as ls:
        ls.routes["/tasks/9/presign/"] = redirect(good, 303)
        ls.routes["/tasks/10/presign/"] = redirect(gone, 303)
        with_ls = dataclasses.replace(fetch.settings, label_studio_url=ls.url, label_studio_api_key="ls-key-123456")
        assert ImageFetcher(with_ls).fetch("/tasks/9/presign/?fileuri=czM6Ly9mbG93Y2Ft") == crop.read_bytes()
        assert ls.hits("/tasks/9/presign/")[0]["Authorization"] == "Token ls-key-123456"
        with pytest.raises(ImageError, match="answered HTTP 404") as exc:
            ImageFetcher(with_ls).fetch("/tasks/10/presign/?fileuri=czM6Ly9mbG93Y2Ft")
        name, (signature,) = next((k, v) for k, v in parse_qs(urlsplit(gone).query).items() if "Signature" in k)
        assert f"{name}=***" in str(exc.value) and signature not in str(exc.value)
        # Without S3_ENDPOINT_URL naming it, the loopback endpoint is refused like any private address.
        with pytest.raises(ImageError, match="refused: 127.0.0.1 is not a public address"):
            ImageFetcher(dataclasses.replace(with_ls, s3_endpoint_url="")).fetch("/tasks/9/presign/?fileuri=czM6")
