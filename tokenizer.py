"""Text <-> token ids for the Llama family: one Tokenizer over SentencePiece or tiktoken.

    tok = Tokenizer.from_pretrained("checkpoints/smollm2-135m")  # a folder, a tokenizer.model or a .gguf file
    ids = tok.encode("The capital of France is", bos=True)
    text = tok.decode(ids)

Formats, told apart by their content:
- SentencePiece `tokenizer.model` (Llama 1/2, Mistral): a protobuf, read by sentencepiece.
- tiktoken rank file, also named `tokenizer.model` (Llama 3): "<base64 bytes> <rank>" lines, rank = token id.
  Meta's split pattern and 256 special tokens are assumed unless a `tiktoken.json` next to it says otherwise.
- GGUF (llama.cpp), `tokenizer.ggml.*` metadata: `gpt2` byte-level BPE vocabularies map onto tiktoken; `llama`
  (SentencePiece BPE) vocabularies are rebuilt as a SentencePiece model.
A Hugging Face `tokenizer.json` is not read. save_pretrained writes `tokenizer.model` (and `tiktoken.json` for a
tiktoken vocabulary), which from_pretrained reads back.
Text that spells a special token ("<|eot_id|>", "<s>") is encoded as plain text; special ids come only from bos/eos.
"""
import base64
import json
import re
import struct
from pathlib import Path

import regex
import sentencepiece
import tiktoken

from common import write_atomic, write_json

# Meta's llama3/tokenizer.py
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(LLAMA3_SPECIAL))]

# tokenizer.ggml.pre -> split pattern. llama.cpp's `smollm` (shared with `starcoder`) splits off every digit, then
# applies GPT-2's pattern to the rest; `\s+(?=\p{N})` is the whitespace run that the digit split leaves behind.
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"
GGUF_PATTERNS = {
    "llama-bpe": LLAMA3_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "starcoder": SMOLLM_PATTERN,
}
GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_BYTE = 3, 4, 6  # llama.cpp's token types, numbered as sentencepiece's


def gpt2_unicode_to_byte():
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68 for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def protobuf_field(number, value):
    """One protobuf field: bool/int as varint, float as fixed32, str/bytes length-delimited."""
    if isinstance(value, float):
        return protobuf_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return protobuf_varint(number << 3) + protobuf_varint(value)
    value = value.encode() if isinstance(value, str) else value
    return protobuf_varint(number << 3 | 2) + protobuf_varint(len(value)) + value


def protobuf_varint(n):
    out = b""
    while n > 0x7F:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def sentencepiece_model(tokens, scores, types, unk_id, bos_id, eos_id, add_dummy_prefix):
    """A serialized sentencepiece ModelProto (BPE, settings as in Llama's tokenizer.model) for a GGUF `llama`
    vocabulary. Written by hand: sentencepiece's sentencepiece_model_pb2 would need the protobuf package."""
    # field numbers of sentencepiece_model.proto. ModelProto: pieces 1 {piece 1, score 2, type 3}, trainer_spec 2,
    # normalizer_spec 3; TrainerSpec: model_type 3 (BPE = 2), vocab_size 4, byte_fallback 35, unk/bos/eos_id 40/41/42;
    # NormalizerSpec: name 1, add_dummy_prefix 3, remove_extra_whitespaces 4
    pieces = b"".join(protobuf_field(1, protobuf_field(1, t) + protobuf_field(2, float(s)) + protobuf_field(3, int(ty)))
                      for t, s, ty in zip(tokens, scores, types))
    trainer = (protobuf_field(3, 2) + protobuf_field(4, len(tokens)) + protobuf_field(35, GGUF_BYTE in types)
               + protobuf_field(40, unk_id) + protobuf_field(41, bos_id) + protobuf_field(42, eos_id))
    normalizer = protobuf_field(1, "identity") + protobuf_field(3, add_dummy_prefix) + protobuf_field(4, False)
    return pieces + protobuf_field(2, trainer) + protobuf_field(3, normalizer)


def read_tiktoken_json(path):
    """The settings in a tiktoken.json (what save_pretrained writes next to a tiktoken tokenizer.model), each checked:
    exactly pattern (a regex), special_tokens ({str: id}), bos_id and eos_id (an id or null); ids are integers >= 0."""
    keys = ("pattern", "special_tokens", "bos_id", "eos_id")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or set(meta) != set(keys):
        has = f"the keys {', '.join(map(repr, meta))}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{path} must be a JSON object with the keys {', '.join(keys)} (it holds {has})")

    def is_id(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    special = meta["special_tokens"]
    if not isinstance(special, dict) or not all(is_id(i) for i in special.values()) \
            or not all(x is None or is_id(x) for x in (meta["bos_id"], meta["eos_id"])):
        raise ValueError(f"{path}: special_tokens must map names to ids, and bos_id and eos_id be ids or null (ids "
                         "are integers >= 0)")
    try:
        regex.compile(meta["pattern"])
    except (TypeError, regex.error) as e:
        raise ValueError(f"{path}: pattern is not a regular expression ({e})") from None
    return meta


class Tokenizer:
    def __init__(self, sp=None, ranks=None, pattern=None, special_tokens=None, bos_id=None, eos_id=None):
        """Either a SentencePieceProcessor `sp`, or a byte-level BPE for tiktoken: `ranks` (token bytes -> id, lower
        merges first), the split `pattern`, `special_tokens` (str -> id) and the bos/eos ids."""
        self.sp = sp
        if sp is not None:
            self.bos_id, self.eos_id, self.vocab_size = sp.bos_id(), sp.eos_id(), sp.get_piece_size()
            return
        self.ranks, self.pattern, self.special_tokens = ranks, pattern, special_tokens
        self.enc = tiktoken.Encoding("tokenizer", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, self.enc.n_vocab
        self.single_bytes = {token[0] for token in ranks if len(token) == 1}

    @classmethod
    def from_pretrained(cls, path):
        """Load a checkpoint folder's tokenizer.model, or a tokenizer.model / .gguf file."""
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.model").exists() and (path / "tokenizer.json").exists():
                raise ValueError(f"{path} has only a Hugging Face tokenizer.json, which tokenizer.py does not read: "
                                 f"copy the model's tokenizer.model (SentencePiece or tiktoken) into it")
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}: give a checkpoint folder with a tokenizer.model, "
                                    f"a tokenizer.model file or a .gguf file")
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return cls.from_gguf(path)
        data = path.read_bytes()
        if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", data.split(b"\n", 1)[0]):
            ranks = {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, data.splitlines())}
            meta = path.parent / "tiktoken.json"
            if meta.exists():
                return cls(ranks=ranks, **read_tiktoken_json(meta))
            special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
            return cls(ranks=ranks, pattern=LLAMA3_PATTERN, special_tokens=special,
                       bos_id=special["<|begin_of_text|>"], eos_id=special["<|end_of_text|>"])
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise ValueError(f"{path} is not a SentencePiece model, a tiktoken rank file or a GGUF file") from None
        return cls(sp=sp)

    @classmethod
    def from_gguf(cls, path):
        """The tokenizer in a GGUF file's tokenizer.ggml.* metadata."""
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        meta = {k.removeprefix("tokenizer.ggml."): f.contents() for k, f in fields.items()
                if k.startswith("tokenizer.ggml.")}
        model, tokens, types = meta.get("model"), meta.get("tokens"), meta.get("token_type")
        if model == "llama":
            proto = sentencepiece_model(tokens, meta["scores"], types, meta.get("unknown_token_id", 0),
                                        meta.get("bos_token_id", 1), meta.get("eos_token_id", 2),
                                        meta.get("add_space_prefix", True))
            return cls(sp=sentencepiece.SentencePieceProcessor(model_proto=proto))
        if model == "gpt2":
            pre = meta.get("pre", "default")
            if pre not in GGUF_PATTERNS:
                raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (known: "
                                 f"{', '.join(GGUF_PATTERNS)}); add its split pattern to GGUF_PATTERNS")
            # user-defined tokens are stored as raw text, not byte-level: like control tokens, never split out of text
            special = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
                       if ty in (GGUF_CONTROL, GGUF_USER_DEFINED)}
            to_byte = gpt2_unicode_to_byte()
            ranks = {bytes(map(to_byte.get, t)): i for i, t in enumerate(tokens) if t not in special}
            return cls(ranks=ranks, pattern=GGUF_PATTERNS[pre], special_tokens=special,
                       bos_id=meta.get("bos_token_id"), eos_id=meta.get("eos_token_id"))
        raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported (known: gpt2, llama)")

    def save_pretrained(self, path):
        """Write tokenizer.model (and tiktoken.json for a tiktoken vocabulary) into the folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.sp is not None:
            write_atomic(path / "tokenizer.model", lambda tmp: tmp.write_bytes(self.sp.serialized_model_proto()))
            return
        ranks = sorted(self.ranks.items(), key=lambda item: item[1])
        write_atomic(path / "tokenizer.model",
                     lambda tmp: tmp.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks)))
        meta = {"pattern": self.pattern, "special_tokens": self.special_tokens,
                "bos_id": self.bos_id, "eos_id": self.eos_id}
        write_json(path / "tiktoken.json", meta)

    def check_fits(self, vocab_size, where):
        """Every id this tokenizer can produce must have a row in the model's embedding table."""
        if self.vocab_size > vocab_size:
            raise ValueError(f"{where}: the tokenizer has {self.vocab_size} tokens but the model's embedding table "
                             f"has {vocab_size} rows: the tokenizer belongs to another model")
        for name, i in (("bos_id", self.bos_id), ("eos_id", self.eos_id)):
            if i is not None and i >= vocab_size:
                raise ValueError(f"{where}: the tokenizer's {name} is {i}, but the model's embedding table has "
                                 f"{vocab_size} rows (0..{vocab_size - 1}): the tokenizer belongs to another model")

    def encode(self, text, bos=False, eos=False):
        ids = self.sp.encode(text) if self.sp is not None else self.encode_bpe(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_bpe(self, text):
        unspellable = [c for c in set(text) if not self.single_bytes.issuperset(c.encode())]
        if not unspellable:
            return self.enc.encode_ordinary(text)
        # The vocabulary lacks a byte of these characters (SmolLM2 has no token for 0x04, 0x06, 0x13, 0x14, 0x16,
        # 0x1d). Like Hugging Face's BPE, drop them after the split, so that their neighbours in a piece still merge.
        drop = str.maketrans(dict.fromkeys(unspellable))
        pieces = (piece.translate(drop) for piece in regex.findall(self.pattern, text))
        return [i for piece in pieces for i in self.enc.encode_ordinary(piece)]

    def decode(self, ids):
        return self.sp.decode(ids) if self.sp is not None else self.enc.decode(ids)
