"""Pretrained registry: download (file:// and a local HTTP server), hash checks, cache reuse, offline message."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import socket
import threading

import numpy as np
import pytest
import safetensors.torch

from jaxtl.convert import (
    REGISTRY,
    HashMismatchError,
    PretrainedEntry,
    PretrainedUnavailableError,
    load_pretrained,
    load_torchvision,
    load_variables,
    save_variables,
    variables_to_state_dict,
)
from jaxtl.convert.registry import register
from jaxtl.models import ARCHS


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a, b, arch="resnet18") -> None:
    sa, sb = variables_to_state_dict(a, arch), variables_to_state_dict(b, arch)
    assert set(sa) == set(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


def _entry(name, url, sha, filename="resnet18-test.pth", fmt="torchvision") -> PretrainedEntry:
    return PretrainedEntry(name, "resnet18", url, sha, filename, fmt)


@pytest.fixture
def serve(tmp_path):
    """A static HTTP server on 127.0.0.1 serving a folder; yields (base_url, folder, request log)."""
    folder = tmp_path / "www"
    folder.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder, requests
    finally:
        server.shutdown()
        server.server_close()


def test_file_url_download_convert_and_cache(tmp_path, monkeypatch, resnet18_pth):
    src = tmp_path / "mirror" / "resnet18-test.pth"
    src.parent.mkdir()
    src.write_bytes(resnet18_pth.read_bytes())
    monkeypatch.setitem(REGISTRY, "resnet18.test_file", _entry("resnet18.test_file", src.as_uri(), _digest(src)))
    cache = tmp_path / "cache"

    v1 = load_pretrained("resnet18.test_file", "resnet18", cache_dir=cache, progress=False)
    _same(v1, load_torchvision(str(resnet18_pth), "resnet18"))
    raw, converted = cache / "resnet18-test.pth", cache / "converted" / "resnet18.test_file.safetensors"
    assert raw.is_file() and converted.is_file()
    assert _digest(raw) == _digest(src)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]

    src.unlink()  # any further download attempt would now fail
    _same(load_pretrained("resnet18.test_file", "resnet18", cache_dir=cache, progress=False), v1)  # converted cache
    converted.unlink()
    _same(load_pretrained("resnet18.test_file", "resnet18", cache_dir=cache, progress=False), v1)  # raw cache
    assert converted.is_file()
    converted.write_bytes(b"damaged")  # a damaged conversion is redone from the raw cache and replaced
    _same(load_pretrained("resnet18.test_file", "resnet18", cache_dir=cache, progress=False), v1)
    _same(load_variables(converted)[0], v1)


def test_http_download_once_with_progress_bar(tmp_path, monkeypatch, serve, capsys, resnet18_pth):
    base, folder, requests = serve
    (folder / "resnet18-test.pth").write_bytes(resnet18_pth.read_bytes())
    entry = _entry("resnet18.test_http", f"{base}/resnet18-test.pth", _digest(resnet18_pth))
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path / "envcache"))  # no cache_dir: the env var decides

    v1 = load_pretrained(entry.name, "resnet18")
    err = capsys.readouterr().err
    assert "resnet18-test.pth" in err and "100%" in err  # tqdm bar with the known Content-Length
    v2 = load_pretrained(entry.name, "resnet18")
    assert requests == ["/resnet18-test.pth"]  # downloaded exactly once
    assert (tmp_path / "envcache" / "resnet18-test.pth").is_file()
    _same(v1, v2)


def test_hash_mismatch_leaves_no_file(tmp_path, monkeypatch, serve, resnet18_pth):
    base, folder, _ = serve
    (folder / "resnet18-test.pth").write_bytes(resnet18_pth.read_bytes())
    wrong = "0" * 64
    monkeypatch.setitem(REGISTRY, "resnet18.bad", _entry("resnet18.bad", f"{base}/resnet18-test.pth", wrong))
    cache = tmp_path / "cache"
    with pytest.raises(HashMismatchError, match=f"expects {wrong}") as err:
        load_pretrained("resnet18.bad", "resnet18", cache_dir=cache, progress=False)
    assert _digest(resnet18_pth) in str(err.value)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_prefix_hash_rule_like_torch_hub(tmp_path, monkeypatch, resnet18_pth):
    digest = _digest(resnet18_pth)
    url = resnet18_pth.as_uri()
    monkeypatch.setitem(REGISTRY, "resnet18.prefix", _entry("resnet18.prefix", url, digest[:8]))
    load_pretrained("resnet18.prefix", "resnet18", cache_dir=tmp_path / "a", progress=False)
    bad_prefix = ("1" if digest[0] != "1" else "2") + digest[1:8]
    monkeypatch.setitem(REGISTRY, "resnet18.prefix", _entry("resnet18.prefix", url, bad_prefix))
    with pytest.raises(HashMismatchError):
        load_pretrained("resnet18.prefix", "resnet18", cache_dir=tmp_path / "b", progress=False)


def test_corrupt_cached_file_is_reported(tmp_path, monkeypatch, resnet18_pth):
    entry = _entry("resnet18.c", resnet18_pth.as_uri(), _digest(resnet18_pth))
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    (tmp_path / "resnet18-test.pth").write_bytes(b"not the file")
    with pytest.raises(HashMismatchError, match="Delete it"):
        load_pretrained(entry.name, "resnet18", cache_dir=tmp_path, progress=False)


def test_offline_message_names_url_file_and_folder(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet18-abcdef12.pth"
    entry = _entry("resnet18.offline", url, "a" * 64, "resnet18-abcdef12.pth")
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    cache = tmp_path / "cache"
    with pytest.raises(PretrainedUnavailableError) as err:
        load_pretrained("resnet18.offline", "resnet18", cache_dir=cache, progress=False)
    msg = str(err.value)
    assert url in msg and "'resnet18-abcdef12.pth'" in msg and str(cache) in msg and "model.pretrained" in msg
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_http_404_is_reported(tmp_path, monkeypatch, serve):
    base, _, _ = serve
    monkeypatch.setitem(REGISTRY, "resnet18.gone", _entry("resnet18.gone", f"{base}/missing.pth", "a" * 64))
    with pytest.raises(PretrainedUnavailableError, match="HTTP 404"):
        load_pretrained("resnet18.gone", "resnet18", cache_dir=tmp_path, progress=False)


def test_local_files_of_every_format(tmp_path, resnet18_pth, resnet18_torch):
    ref = load_torchvision(str(resnet18_pth), "resnet18")
    _same(load_pretrained(str(resnet18_pth), "resnet18"), ref)
    timm = tmp_path / "model.safetensors"
    safetensors.torch.save_file(resnet18_torch.state_dict(), str(timm))
    _same(load_pretrained(str(timm), "resnet18"), ref)
    ours = save_variables(tmp_path / "ours.safetensors", ref, {"arch": "resnet18"})
    _same(load_pretrained(str(ours), "resnet18"), ref)
    with pytest.raises(ValueError, match="holds resnet18 weights"):
        load_pretrained(str(ours), "resnet34")


def test_spec_errors():
    with pytest.raises(ValueError, match="holds resnet50 weights, but model.arch='resnet34'"):
        load_pretrained("resnet50.a1_in1k", "resnet34")
    with pytest.raises(ValueError, match="resnet34.tv_in1k") as err:
        load_pretrained("resnet34.nope", "resnet34")
    assert "neither an existing file nor a registry name" in str(err.value)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_pretrained("/nonexistent/r34.pth", "resnet34")
    with pytest.raises(ValueError, match="already exists"):
        register(REGISTRY["resnet34.tv_in1k"])


def test_registry_entries_are_consistent():
    for name in ("resnet18.tv_in1k", "resnet34.tv_in1k", "resnet50.tv_in1k", "resnet50.tv2_in1k",
                 "resnet101.tv_in1k", "resnet152.tv_in1k", "resnet50.a1_in1k"):
        assert name in REGISTRY
    for name, e in REGISTRY.items():
        assert e.name == name and e.arch in ARCHS and name.split(".")[0] == e.arch
        assert e.url.startswith("https://") and e.format in ("torchvision", "timm")
        assert re.fullmatch(r"[0-9a-f]{64}|[0-9a-f]{8}", e.sha256), name
        if e.format == "torchvision":
            # torchvision file names carry the first 8 hex digits of the file's SHA-256.
            m = re.fullmatch(r"resnet\d+-([0-9a-f]{8})\.pth", e.filename)
            assert m and e.sha256.startswith(m.group(1)) and e.url.endswith("/" + e.filename), name
