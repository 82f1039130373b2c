import hashlib
import io
import os
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools import assets
from conftest import ROOT, one_error_line


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """An empty cache, a fake package fake-pkg==1.0 in ARCHIVES, and a fake `pip download` that saves `served`."""
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake_pkg/data.txt", "the real content")
    good = wheel.getvalue()
    name = "fake_pkg-1.0-py3-none-any.whl"
    monkeypatch.setattr(assets, "CACHE", tmp_path / "cache")
    monkeypatch.setitem(assets.ARCHIVES, ("fake-pkg", "1.0"), (name, hashlib.sha256(good).hexdigest()))
    pypi = {"served": good, "downloads": 0, "returncode": 0}

    def pip_download(cmd, **kwargs):
        assert cmd[-1] == "fake-pkg==1.0" and "--no-deps" in cmd and "--only-binary" in cmd
        pypi["downloads"] += 1
        if pypi["returncode"] == 0:
            (Path(cmd[cmd.index("--dest") + 1]) / name).write_bytes(pypi["served"])
        return subprocess.CompletedProcess(cmd, pypi["returncode"], "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", pip_download)
    return pypi


def test_fetch_file_downloads_once_then_reuses_the_cache(fake_pypi):
    path = assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt")
    assert path.read_text() == "the real content"
    assert assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt") == path
    assert fake_pypi["downloads"] == 1


def test_corrupt_cached_archive_is_downloaded_again(fake_pypi):
    assets.CACHE.mkdir()
    (assets.CACHE / "fake_pkg-1.0-py3-none-any.whl").write_bytes(b"truncated download")
    assert assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt").read_text() == "the real content"
    assert fake_pypi["downloads"] == 1


def test_download_with_wrong_sha256_is_a_clear_error(fake_pypi):
    fake_pypi["served"] = b"tampered"
    with pytest.raises(ValueError, match="fake_pkg-1.0-py3-none-any.whl from PyPI has sha256 .*, expected"):
        assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt")
    assert not list(assets.CACHE.rglob("*.whl"))


def test_pip_failure_is_a_clear_error(fake_pypi):
    fake_pypi["returncode"] = 1
    with pytest.raises(OSError, match=r"pip download fake-pkg==1.0 failed \(ERROR: No matching distribution"):
        assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt")


def test_unknown_package_or_member_is_a_clear_error(fake_pypi):
    with pytest.raises(ValueError, match="no sha256 known for torch==2.13.0"):
        assets.fetch_file("torch", "2.13.0", "torch/__init__.py")
    with pytest.raises(ValueError, match="has no file fake_pkg/missing.txt"):
        assets.fetch_file("fake-pkg", "1.0", "fake_pkg/missing.txt")


def test_real_wheel_from_pypi_replaces_a_corrupt_cached_copy(tmp_path, monkeypatch):
    member = "mistral_common/data/tokenizer.model.v1"
    expected = assets.fetch_file("mistral-common", "1.13.1", member).read_bytes()
    monkeypatch.setattr(assets, "CACHE", tmp_path)
    (tmp_path / "mistral_common-1.13.1-py3-none-any.whl").write_bytes(b"corrupt")
    assert assets.fetch_file("mistral-common", "1.13.1", member).read_bytes() == expected


def test_a_damaged_unpacked_file_is_unpacked_again(fake_pypi):
    """A cached copy is checked against the size and sha256 recorded when it was unpacked: a flipped byte (a
    corrupt GGUF would otherwise convert without complaint) or a cut is noticed, and the file unpacked again."""
    path = assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt")
    for damage in (b"the real contenT", b"the real"):
        path.write_bytes(damage)
        assert assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt").read_text() == "the real content"
    path.with_name("data.txt.sha256").unlink()  # unpacked by an older version: no record, so unpacked again
    assert assets.fetch_file("fake-pkg", "1.0", "fake_pkg/data.txt").read_text() == "the real content"
    assert fake_pypi["downloads"] == 1


def test_the_default_checkpoint_is_converted_only_once(tmp_path):
    from convert_llama import default_checkpoint

    out = tmp_path / "smollm2"
    assert default_checkpoint(out) == out
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert default_checkpoint(out) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "config.json").read_text())["source"] == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"


def test_books_are_utf8_with_unix_newlines_and_rewritten_when_damaged(tmp_path):
    paths = assets.ensure_books(tmp_path)
    assert [p.name for p in paths] == ["alice29.txt", "asyoulik.txt", "plrabn12.txt", "lcet10.txt", "botchan.txt"]
    for path in paths:
        text = path.read_bytes().decode()
        assert len(text) > 100_000 and "\r" not in text and not text.startswith("\ufeff")
    assert "ALICE'S ADVENTURES IN WONDERLAND" in paths[0].read_text()
    expected = paths[1].read_bytes()
    paths[1].write_bytes(expected[:1000])
    assert assets.ensure_books(tmp_path)[1].read_bytes() == expected


def test_help_and_bad_command():
    run = subprocess.run([sys.executable, "-m", "tools.assets", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "python -m tools.assets smollm2" in run.stdout
    run = subprocess.run([sys.executable, "-m", "tools.assets", "weights"], cwd=ROOT, capture_output=True, text=True)
    one_error_line(run, "assets.py", "invalid choice: 'weights'", code=2)


def test_the_cache_moves_with_yarn_assets_cache_or_xdg_cache_home(tmp_path):
    def cache(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("YARN_ASSETS_CACHE", "XDG_CACHE_HOME")}
        run = subprocess.run([sys.executable, "-c", "from tools import assets; print(assets.CACHE)"], cwd=ROOT,
                             capture_output=True, text=True, env={**base, **env})
        return run.stdout.strip()

    assert cache(YARN_ASSETS_CACHE=str(tmp_path / "a"), XDG_CACHE_HOME=str(tmp_path / "x")) == str(tmp_path / "a")
    assert cache(XDG_CACHE_HOME=str(tmp_path / "x")) == str(tmp_path / "x" / "yarn-assets")
    assert cache(HOME=str(tmp_path)) == str(tmp_path / ".cache" / "yarn-assets")
