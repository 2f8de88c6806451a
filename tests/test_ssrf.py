"""The outbound guard, through `ImageFetcher.fetch` as the worker calls it, against real servers on loopback.

Loopback is refused by default, so these servers are reachable only where a test allows them (IMAGE_HOSTS,
LABEL_STUDIO_URL, S3_ENDPOINT_URL). Every refusal is checked to happen before any connection: the server
behind the refused address counts none.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.servers import Server, closed_port, hosts, redirect, respond, running, settings
from worker.images import ImageError, ImageFetcher

SECRET = "secret-key-123"
REFUSED = r"refused: .* is not a public address"


@pytest.fixture(scope="module")
def target() -> Iterator[Server]:
    """The server an attacker would like to reach (loopback, IPv4)."""
    with running() as srv:
        srv.routes["/secret"] = respond(b"internal")
        yield srv


@pytest.fixture(scope="module")
def target6() -> Iterator[Server]:
    with running("::1") as srv:
        srv.routes["/secret"] = respond(b"internal")
        yield srv


def refused(fetcher: ImageFetcher, url: str) -> ImageError:
    start = time.monotonic()
    with pytest.raises(ImageError, match=REFUSED) as exc:
        fetcher.fetch(url)
    assert time.monotonic() - start < 0.5, "refused before connecting, not after a timeout"
    assert not exc.value.transient
    return exc.value


LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.0.0.2",
                      "localhost", "LOCALHOST.", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[2002:7f00:1::]",
                      "[64:ff9b::7f00:1]", "0.0.0.0"]  # fmt: skip


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_in_every_spelling_is_refused(target: Server, host: str):
    before = target.connections
    for scheme in ("http", "https"):
        refused(ImageFetcher(settings()), f"{scheme}://{host}:{target.port}/secret")
    assert target.connections == before


def test_ipv6_loopback_is_refused(target6: Server):
    refused(ImageFetcher(settings()), f"http://[::1]:{target6.port}/secret")
    assert target6.connections == 0


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/a.png", "http://10.255.255.254:8080/a.png", "http://172.16.0.1/a.png", "http://192.168.1.1/a.png",
     "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "http://[fd00:ec2::254]/latest/",
     "http://100.64.0.1/a.png", "http://224.0.0.1/a.png", "http://[ff02::1]/a.png", "http://[fe80::1]/a.png",
     "http://[fc00::1]/a.png", "http://[::]/a.png", "http://240.0.0.1/a.png", "http://167772161/a.png"],
)  # fmt: skip
def test_private_link_local_multicast_and_reserved_addresses_are_refused(url: str):
    refused(ImageFetcher(settings()), url)


def test_a_name_that_resolves_to_loopback_is_refused(target: Server):
    fetcher = ImageFetcher(settings())
    fetcher.guard.resolver = hosts({"images.attacker.example": "127.0.0.1", "v6.attacker.example": "::1"})
    refused(fetcher, f"http://images.attacker.example:{target.port}/secret")
    refused(fetcher, f"http://v6.attacker.example:{target.port}/secret")
    assert target.connections == 0 or all(p != "/secret" for _, p, _ in target.requests)


def test_refusals_do_not_tell_open_ports_from_closed_ones(target: Server):
    fetcher = ImageFetcher(settings())
    for host, ports in [("127.0.0.1", [target.port, closed_port()]), ("10.0.0.1", [22, 9, 8080])]:
        messages = {
            str(refused(fetcher, f"http://{host}:{port}/x.png")).replace(f":{port}/", ":PORT/") for port in ports
        }
        assert len(messages) == 1, messages


@pytest.mark.parametrize("where", ["127.0.0.1:{port}", "localhost:{port}", "169.254.169.254", "[::1]:{port}"])
def test_a_public_looking_url_that_redirects_inside_is_refused(target: Server, where: str):
    with running() as public:  # stands in for a public host: allowed by name, as a public address would be
        public.routes["/start.png"] = redirect(f"http://{where.format(port=target.port)}/secret")
        fetcher = ImageFetcher(settings(image_hosts=f"cdn.example.com:{public.port}"))
        fetcher.guard.resolver = hosts({"cdn.example.com": "127.0.0.1"})
        before = len(target.requests)
        error = refused(fetcher, f"http://cdn.example.com:{public.port}/start.png")
        assert len(public.hits("/start.png")) == 1 and len(target.requests) == before
        assert "cdn.example.com" in str(error) or where.split(":")[0] in str(error)


def test_a_cross_origin_redirect_carries_no_authorization():
    with running() as ls, running() as images:
        images.routes["/a.png"] = respond(b"image bytes")
        ls.routes["/data/upload/1/a.png"] = redirect(f"http://localhost:{images.port}/a.png")
        ls.routes["/tasks/5/presign/"] = redirect(f"http://localhost:{images.port}/a.png", 303)
        ls.routes["/data/upload/1/b.png"] = redirect("/data/upload/1/c.png")
        ls.routes["/data/upload/1/c.png"] = respond(b"same origin")
        fetcher = ImageFetcher(settings(label_studio_url=ls.url, label_studio_api_key=SECRET,
                                        image_hosts=f"localhost:{images.port}"))  # fmt: skip
        assert fetcher.fetch("/data/upload/1/a.png") == b"image bytes"
        assert fetcher.fetch("/tasks/5/presign/?fileuri=czM6Ly9iL2EucG5n") == b"image bytes"
        assert [h.get("Authorization") for h in ls.hits("/data/upload/1/a.png") + ls.hits("/tasks/5/presign/")] == [
            f"Token {SECRET}"] * 2  # fmt: skip
        assert [h.get("Authorization") for h in images.hits("/a.png")] == [None, None]
        # A redirect within Label Studio's origin keeps it.
        assert fetcher.fetch("/data/upload/1/b.png") == b"same origin"
        assert ls.hits("/data/upload/1/c.png")[0].get("Authorization") == f"Token {SECRET}"


@pytest.mark.parametrize(
    "location",
    ["http://localhost:{other}\\@127.0.0.1:{ls}/x", "http://localhost:{other}\\@localhost:{ls}/x",
     "http://127.0.0.1:{ls}@localhost:{other}/x", "http://user:pw@127.0.0.1:{ls}/x",
     "http://127.0.0.1:{ls}\t@localhost:{other}/x"],
)  # fmt: skip
def test_a_redirect_that_url_parsers_read_differently_is_refused_and_keeps_the_key(location: str):
    """Same-origin is decided by the parser that connects (urllib3). `http://localhost:B\\@127.0.0.1:A/x` is
    Label Studio's origin to urllib.parse but localhost:B to urllib3: such URLs are refused outright, and the
    server on B never sees Label Studio's key."""
    with running() as ls, running() as other:
        other.routes["/x"] = respond(b"stolen")
        ls.routes["/data/upload/1/a.png"] = redirect(location.format(other=other.port, ls=ls.port))
        fetcher = ImageFetcher(settings(label_studio_url=ls.url, label_studio_api_key=SECRET,
                                        image_hosts=f"localhost:{other.port}"))  # fmt: skip
        with pytest.raises(ImageError, match="refused") as exc:
            fetcher.fetch("/data/upload/1/a.png")
        assert other.requests == [] and not exc.value.transient
        assert SECRET not in str(exc.value)


@pytest.mark.parametrize(
    "url",
    ["http://user:pw@{host}/secret", "http://{host}\\@example.com/secret", "http://example.com\\@{host}/secret",
     "http://{host}/secret\\x"],
)  # fmt: skip
def test_urls_with_a_user_or_a_backslash_are_refused_before_connecting(target: Server, url: str):
    fetcher = ImageFetcher(settings(image_hosts="127.0.0.1"))
    with pytest.raises(ImageError, match="refused: a (user name or password|backslash)"):
        fetcher.fetch(url.format(host=f"127.0.0.1:{target.port}"))
    assert target.connections == 0 or all(p != "/secret" for _, p, _ in target.requests)


def test_a_name_that_does_not_resolve_gets_the_refusal_of_a_private_one():
    """Job errors must not tell which internal names exist: an unlisted name that resolves to a private address
    and one that resolves to nothing (the system's resolver, `.invalid`) get one message, and neither is
    retried."""
    fetcher = ImageFetcher(settings())
    fetcher.guard.resolver = hosts({"db.internal.example": "10.0.0.5", "cache.internal.example": "127.0.0.1"})
    errors = {name: refused(fetcher, f"http://{name}:8080/a.png")
              for name in ("db.internal.example", "cache.internal.example", "nothing-here.invalid")}  # fmt: skip
    shown = {str(e).replace(name, "NAME") for name, e in errors.items()}
    assert len(shown) == 1, shown
    assert {e.transient for e in errors.values()} == {False}


def test_image_hosts_host_and_host_port(target: Server):
    with running() as other:
        other.routes["/secret"] = respond(b"other")
        only_port = ImageFetcher(settings(image_hosts=f"127.0.0.1:{target.port}"))
        assert only_port.fetch(f"{target.url}/secret") == b"internal"
        assert only_port.fetch(f"http://127.1:{target.port}/secret") == b"internal"  # the same address
        with pytest.raises(ImageError, match="is allowed on other ports only") as exc:
            only_port.fetch(f"{other.url}/secret")
        assert not exc.value.transient and other.connections == 0
        any_port = ImageFetcher(settings(image_hosts=f" example.org , 127.0.0.1 ,localhost:{closed_port()}"))
        assert any_port.fetch(f"{target.url}/secret") == b"internal"
        assert any_port.fetch(f"{other.url}/secret") == b"other"
        # A name is allowed as written: "localhost" does not allow 127.0.0.1, nor the other way round.
        by_name = ImageFetcher(settings(image_hosts="localhost"))
        assert by_name.fetch(f"http://localhost:{target.port}/secret") == b"internal"
        refused(by_name, f"{target.url}/secret")
        refused(ImageFetcher(settings(image_hosts="127.0.0.1")), f"http://localhost:{target.port}/secret")


def test_image_hosts_ipv6_entry(target6: Server):
    assert ImageFetcher(settings(image_hosts=f"[::1]:{target6.port}")).fetch(f"{target6.url}/secret") == b"internal"
    assert ImageFetcher(settings(image_hosts="::1")).fetch(f"{target6.url}/secret") == b"internal"


@pytest.mark.parametrize("entry", ["host:port", "host:99999", "http://", "a b"])
def test_bad_image_hosts_entries_stop_the_worker_at_start(entry: str):
    with pytest.raises(ValueError, match="IMAGE_HOSTS"):
        ImageFetcher(settings(image_hosts=f"ok.example,{entry}"))


def test_label_studio_and_the_s3_endpoint_are_allowed_on_their_own_port_only(target: Server):
    with running() as ls, running() as s3:
        ls.routes["/data/upload/1/a.png"] = respond(b"from ls")
        s3.routes["/bucket/key.png"] = respond(b"from s3")
        fetcher = ImageFetcher(settings(label_studio_url=ls.url, s3_endpoint_url=s3.url))
        assert fetcher.fetch("/data/upload/1/a.png") == b"from ls"
        assert fetcher.fetch(f"{ls.url}/data/upload/1/a.png") == b"from ls"
        assert fetcher.fetch(f"{s3.url}/bucket/key.png?X-Amz-Signature=abc") == b"from s3"
        refused(fetcher, f"http://127.0.0.1:{target.port}/secret")


@pytest.mark.parametrize(
    "ref",
    ["/data/upload/../../api/projects", "/data/upload/%2e%2e/%2E%2E/api/projects", "data/local-files/../../api/users",
     "/data/upload/1/../../../api/tasks/1", "/data/../api/projects/1/export", "/api/projects", "/data/avatars/x.png",
     "/data/local-files/?d=../../etc/passwd", "/data/local-files/?d=a/../../../x", "/data/local-files/",
     "/data/local-files/?d=a.png&d=b.png", "/tasks/1/presign/", "/tasks/x/presign/?fileuri=a",
     "{ls}/data/../api/projects", "{ls}/api/projects?token=1"],
)  # fmt: skip
def test_label_studio_paths_are_normalised_and_only_file_paths_asked_for(ref: str):
    with running() as ls:
        fetcher = ImageFetcher(settings(label_studio_url=ls.url, label_studio_api_key=SECRET))
        with pytest.raises(ImageError, match="not a Label Studio image path|escapes|needs one") as exc:
            fetcher.fetch(ref.format(ls=ls.url))
        assert ls.requests == [] and not exc.value.transient


@pytest.mark.parametrize(
    ("ref", "asked"),
    [("/data/upload/1/../2/a.png", "/data/upload/2/a.png"), ("data/upload//3/./a b.png", "/data/upload/3/a%20b.png"),
     ("/data/local-files/?d=/flowcam/a.png", "/data/local-files/?d=flowcam/a.png"),
     ("/data/local-files?d=x/../y.png&token=1", "/data/local-files/?d=y.png"),
     ("/tasks/7/resolve/?fileuri=czM6Ly9i&x=1", "/tasks/7/resolve/?fileuri=czM6Ly9i")],
)  # fmt: skip
def test_label_studio_paths_that_stay_file_paths_are_asked_normalised(ref: str, asked: str):
    with running() as ls:
        ls.routes[asked.split("?")[0]] = respond(b"ok")
        fetcher = ImageFetcher(settings(label_studio_url=ls.url, label_studio_api_key=SECRET))
        assert fetcher.fetch(ref) == b"ok"
        assert [p for _, p, _ in ls.requests] == [asked]


def test_messages_carry_no_password_token_or_key():
    with running() as srv, running() as ls:
        srv.routes["/gone.png"] = respond(b"", 404)
        fetcher = ImageFetcher(settings(image_hosts="127.0.0.1", label_studio_url=ls.url,
                                        label_studio_api_key=SECRET))  # fmt: skip
        messages = []
        for ref in [f"http://user:hunter2@127.0.0.1:{srv.port}/gone.png?token=s3cr3t&d=a.png",
                    "http://user:hunter2@10.0.0.1/x.png?sig=s3cr3t", "/data/upload/1/missing.png",
                    f"http://user:hunter2@127.0.0.1:{closed_port()}/x?X-Amz-Signature=s3cr3t"]:  # fmt: skip
            with pytest.raises(ImageError) as exc:
                fetcher.fetch(ref)
            messages.append(str(exc.value))
        text = "\n".join(messages)
        assert "hunter2" not in text and "s3cr3t" not in text and SECRET not in text, text
        assert "token=***" in text and "d=a.png" in text and "404" in text


@pytest.mark.parametrize(("status", "transient"), [(404, False), (403, False), (429, True), (500, False), (503, True)])
def test_status_codes_say_whether_to_retry(status: int, transient: bool):
    transient = transient or status >= 500
    with running() as srv:
        srv.routes["/x.png"] = respond(b"", status)
        with pytest.raises(ImageError, match=f"answered HTTP {status}") as exc:
            ImageFetcher(settings(image_hosts="127.0.0.1")).fetch(f"{srv.url}/x.png")
        assert exc.value.transient is transient


def test_the_connection_goes_to_the_address_that_was_checked(target: Server, monkeypatch: pytest.MonkeyPatch):
    """No second lookup between the check and the connection (DNS rebinding): the guard's resolver is asked
    once per new connection, and nothing else resolves the name."""
    calls: list[str] = []
    resolve = hosts({"images.lab.example": "127.0.0.1"})

    def counting(host: str, port: int):
        calls.append(host)
        return resolve(host, port)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a second lookup: {args}")

    fetcher = ImageFetcher(settings(image_hosts="images.lab.example"))
    fetcher.guard.resolver = counting
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    for _ in range(3):
        assert fetcher.fetch(f"http://images.lab.example:{target.port}/secret") == b"internal"
    assert calls == ["images.lab.example"]  # one connection, kept alive, one lookup


@pytest.mark.parametrize(
    "ref",
    ["http://[::1/", "http://a:b/", "http://:80/", "http://host:99999/", "http://%zz/", "http://exa mple.com/",
     "http://\x00/", "http://ex\u2024ample/", "http:///x", "http://user@/x", "http://[v1.fe]/", "//127.0.0.1/a.png",
     "/data/upload/%00", "/data/upload/", "s3://", "HTTP://10.0.0.1/x", "http://0/", "javascript:alert(1)"],
)  # fmt: skip
def test_malformed_references_fail_their_task_with_an_image_error(ref: str):
    with pytest.raises(ImageError) as exc:
        ImageFetcher(settings(download_timeout=1)).fetch(ref)
    assert not exc.value.transient and str(exc.value)
