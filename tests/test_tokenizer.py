"""The tokenizers against independent references: transformers' tokenizer for SmolLM2's GGUF, llama.cpp's reference
tokenizations (made with each model's own Hugging Face tokenizer), and known ids. Assets come from assets.py."""
import gguf
import pytest

from tools import assets
from tokenizer import Tokenizer

LLAMA_CPP = ("llama-cpp-python", "0.3.36")


def llama_cpp_file(name):
    return assets.fetch_file(*LLAMA_CPP, f"vendor/llama.cpp/models/{name}")


def llama_cpp_vectors(vocab):
    """(text, ids) pairs of llama.cpp's tokenizer test for ggml-vocab-{vocab}.gguf (46 texts: spaces, newlines,
    tabs, digits, emoji, CJK, apostrophes...)."""
    texts = llama_cpp_file(f"ggml-vocab-{vocab}.gguf.inp").read_bytes().decode().split("\n__ggml_vocab_test__\n")
    lines = llama_cpp_file(f"ggml-vocab-{vocab}.gguf.out").read_text().split("\n")
    texts, ids = texts[:-1], [[int(i) for i in line.split()] for line in lines[:-1]]  # each ends with a separator
    assert len(texts) == len(ids) == 46
    return list(zip(texts, ids))


@pytest.fixture(scope="module")
def smollm2():
    return Tokenizer.from_gguf(assets.smollm2_gguf())


@pytest.fixture(scope="module")
def books():
    return [path.read_text() for path in assets.ensure_books()]


def test_smollm2_matches_transformers_gguf_tokenizer_on_books(smollm2, books):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    path = assets.smollm2_gguf()
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF loader ignores tokenizer.ggml.pre ("smollm") and keeps GPT-2's split; SmolLM2's own
    # tokenizer.json, and llama.cpp, first split off every digit (on these books the two differ where a number follows
    # two or more spaces: 145 tokens). Restore SmolLM2's pre-tokenizer so that the oracle is the model's tokenizer.
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # the vocabulary has no token for a few control characters: both drop them, and their neighbours still merge
    # (" .\x04," -> " ", ".,")
    odd = "x\x04y .\x04, 2\x1d3 \x06\x13z  42  \x14 ½ 3² naïve 日本語 🤗\r\n\t"
    n_tokens = 0
    for text in [*books, odd]:
        ids = smollm2.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        n_tokens += len(ids)
    assert n_tokens > 370_000


def test_smollm2_decode_inverts_encode(smollm2, books):
    for text in books:
        assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_special_ids_come_from_the_gguf(smollm2):
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.vocab_size) == (1, 2, 49152)
    assert smollm2.encode("Hi", bos=True, eos=True) == [1, *smollm2.encode("Hi"), 2]
    assert smollm2.decode([1]) == "<|im_start|>"
    assert 1 not in smollm2.encode("<|im_start|>")  # text is never read as a special token


def test_smollm2_save_pretrained_reloads_the_same_tokenizer(smollm2, books, tmp_path):
    smollm2.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiktoken.json", "tokenizer.model"]
    reloaded = Tokenizer.from_pretrained(tmp_path)
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.vocab_size) == (1, 2, 49152)
    text = books[0] + "  42 \x04"
    assert reloaded.encode(text, bos=True) == smollm2.encode(text, bos=True)
    assert reloaded.decode(list(range(49152))) == smollm2.decode(list(range(49152)))


def test_llama_sentencepiece_gguf_matches_llama_cpp_reference(tmp_path):
    tok = Tokenizer.from_pretrained(llama_cpp_file("ggml-vocab-llama-spm.gguf"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.encode("Hello world") == [15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert tok.decode([1, 15043, 3186, 2]) == "Hello world"
    tok.save_pretrained(tmp_path)
    reloaded = Tokenizer.from_pretrained(tmp_path)
    for text, ids in llama_cpp_vectors("llama-spm"):
        assert tok.encode(text) == ids, text
        assert reloaded.encode(text) == ids, text


def test_llama3_tokenizer_model_matches_llama_cpp_reference(tmp_path):
    tok = Tokenizer.from_pretrained(assets.fetch_file("llama-models", "0.3.0", "llama_models/llama3/tokenizer.model"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (128000, 128001, 128256)
    assert tok.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert tok.decode([128000, 9906, 1917]) == "<|begin_of_text|>Hello world"
    tok.save_pretrained(tmp_path)
    reloaded = Tokenizer.from_pretrained(tmp_path)
    assert reloaded.special_tokens == tok.special_tokens
    for text, ids in llama_cpp_vectors("llama-bpe"):
        assert tok.encode(text) == ids, text
        assert reloaded.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_smollm_split_matches_llama_cpp_reference_for_starcoder():
    # llama.cpp splits text for StarCoder's vocabulary as for SmolLM2's (digits one by one, then GPT-2's pattern);
    # its reference ids come from StarCoder's own Hugging Face tokenizer
    tok = Tokenizer.from_gguf(llama_cpp_file("ggml-vocab-starcoder.gguf"))
    for text, ids in llama_cpp_vectors("starcoder"):
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_mistral_tokenizer_model_known_ids(tmp_path):
    path = assets.fetch_file("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1")
    tok = Tokenizer.from_pretrained(path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.encode("Hello world") == [22557, 1526]
    assert tok.encode("Hello world", bos=True) == [1, 22557, 1526]
    assert tok.encode("Hello world", eos=True) == [22557, 1526, 2]
    assert tok.decode([1, 22557, 1526, 2]) == "Hello world"
    tok.save_pretrained(tmp_path)
    assert Tokenizer.from_pretrained(tmp_path / "tokenizer.model").encode("Hello world") == [22557, 1526]


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_hugging_face_tokenizer_json_alone_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_unrecognized_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("model, pre, error", [("gpt2", "qwen2", "pre-tokenizer 'qwen2'"),
                                               ("bert", "default", "model 'bert'")])
def test_unsupported_gguf_tokenizer_is_a_clear_error(tmp_path, model, pre, error):
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b"])
    writer.add_token_types([1, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=error):
        Tokenizer.from_pretrained(tmp_path / "vocab.gguf")
