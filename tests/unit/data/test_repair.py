"""Cache repair and supply chain: cut-short conversions and wheels are redone, recorded hashes are
enforced on re-download, API keys never travel over plain http to a remote host."""

import hashlib
import json
import zipfile

import pytest
from tiny import tiny_model, tiny_tokenizer

import harc.models as models
from harc.data import packages
from harc.data.sources import url_file
from harc.errors import HarcError
from harc.eval.endpoint import ChatEndpoint
from harc.io import atomic_dir

pytestmark = pytest.mark.unit


def test_a_damaged_converted_builtin_model_is_converted_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_convert(gguf, out_dir):
        conversions.append(out_dir)
        with atomic_dir(out_dir) as tmp:
            tiny_model().save_pretrained(tmp)
            tiny_tokenizer().save_pretrained(tmp)
            (tmp / "harc_source.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(models, "builtin_gguf", lambda name: tmp_path / "x.gguf")
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    name = "smollm2-135m-instruct"
    folder, _ = models.resolve_model_path(name)
    assert len(conversions) == 1 and models.local_weights(name) is not None
    models.resolve_model_path(name)
    assert len(conversions) == 1  # intact: used as is
    weights = tmp_path / "cache" / "models" / name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])  # cut short (a full disk, a crash)
    assert models.local_weights(name) is None
    models.resolve_model_path(name)
    assert len(conversions) == 2
    assert "damaged; converting it again" in capsys.readouterr().err
    m, _ = models.load_model(name, device="cpu")
    assert m.config.num_hidden_layers == 4


def _wheel(path, member, data):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def _fake_model(tmp_path, monkeypatch) -> tuple[bytes, object]:
    """A built-in model "fake" whose GGUF is one wheel's payload, that wheel in the cache:
    (payload, wheel path)."""
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    payload = b"GGUF" + bytes(range(256)) * 64
    spec = models.BuiltinModel(packages=("fake-model==1.0",), gguf_name="fake.gguf",
                               sha256=hashlib.sha256(payload).hexdigest(), hf_id="x/fake",
                               license="MIT", note="")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", spec)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    return payload, _wheel(wheels / "fake_model-1.0-py3-none-any.whl", "fake/fake.gguf", payload)


def test_a_cut_model_wheel_is_downloaded_again(tmp_path, monkeypatch, capsys):
    payload, cut = _fake_model(tmp_path, monkeypatch)
    cut.write_bytes(cut.read_bytes()[:200])
    downloads = []

    def fake_download(spec_, dest):  # what pip would fetch: the whole wheel
        downloads.append(spec_)
        _wheel(dest / "fake_model-1.0-py3-none-any.whl", "fake/fake.gguf", payload)
        return packages.subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(packages, "_pip_download", fake_download)
    monkeypatch.delenv("HARC_OFFLINE", raising=False)
    got = models.builtin_gguf("fake")
    assert got.read_bytes() == payload and downloads == ["fake-model==1.0"]
    assert "damaged" in capsys.readouterr().err
    assert not [p for p in got.parent.iterdir() if p.name.startswith(".")]


def test_joining_a_model_leaves_another_process_temporary_alone(tmp_path, monkeypatch):
    # `harc run` and the tests, started together, join the same built-in model at once
    monkeypatch.setenv("HARC_OFFLINE", "1")
    payload, _ = _fake_model(tmp_path, monkeypatch)
    folder = tmp_path / "cache" / "gguf"
    folder.mkdir()
    other = folder / ".fake.gguf.tmp"  # what a process joining the same model is writing
    other.write_bytes(b"GGUF half")
    got = models.builtin_gguf("fake")
    assert got.read_bytes() == payload and other.read_bytes() == b"GGUF half"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == [other.name]


def test_a_cut_dataset_wheel_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HARC_OFFLINE", "1")
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    cut = _wheel(wheels / "some_data-0.1-py3-none-any.whl", "d/x.csv", "a,b\n" * 1000)
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(HarcError, match="HARC_OFFLINE"):
        packages.package_file("some-data==0.1", "d/x.csv")
    assert not cut.exists()  # dropped, so the next online run fetches it again


def test_pip_progress_lines_become_download_reports(monkeypatch, capsys):
    rep = packages.DownloadReport("pkg==1", every_s=0.0)
    rep.tty = False
    rep(1 << 20, 4 << 20)
    rep(4 << 20, 4 << 20)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("harc: downloading pkg==1: 1.0/4.0 MB") and "ETA" in err[0]
    assert "4.0/4.0 MB" in err[-1]


def test_a_file_that_changed_upstream_is_refused_after_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARC_OFFLINE", raising=False)
    src = tmp_path / "upstream.json"
    src.write_text(json.dumps([{"prompt": "a"}]))
    url = src.as_uri()  # a moving branch, unpinned
    first = url_file(url)
    assert first.read_text() == src.read_text()
    src.write_text(json.dumps([{"prompt": "b"}]))  # upstream moves
    first.unlink()  # the cache is lost or damaged
    with pytest.raises(HarcError, match="changed upstream since its first download"):
        url_file(url)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]
    pinned = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(HarcError, match="pinned sha256"):
        url_file(url, sha256="0" * 64)
    assert url_file(url, sha256=pinned).read_text() == src.read_text()


@pytest.mark.parametrize("url,key,ok", [
    ("http://example.com/v1", "k", False),
    ("http://10.0.0.5:8000/v1", "k", False),
    ("https://example.com/v1", "k", True),
    ("http://localhost:8000/v1", "k", True),
    ("http://127.0.0.1:8000/v1", "k", True),
    ("http://example.com/v1", None, True),
])
def test_api_key_never_goes_over_plain_http_to_a_remote_host(url, key, ok, monkeypatch):
    monkeypatch.delenv("HARC_API_KEY", raising=False)
    if ok:
        ChatEndpoint(url, "m", api_key=key)
    else:
        with pytest.raises(HarcError, match="unencrypted"):
            ChatEndpoint(url, "m", api_key=key)


def test_hub_ids_pin_a_revision():
    assert models.split_revision("owner/name@abc123") == ("owner/name", "abc123")
    assert models.split_revision("owner/name") == ("owner/name", None)
    assert models.resolve_model_path("owner/name@abc123") == ("owner/name", None)
    with pytest.raises(HarcError, match="unknown model"):
        models.resolve_model_path("just-a-name@rev")
