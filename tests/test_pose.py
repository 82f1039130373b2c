"""PoSE (Zhu et al. 2023, arXiv 2309.10400) in train.py --pose: the position ids it draws, the model at explicit
position ids (against transformers' position_ids), and the runs: with nothing to skip it is the run without PoSE, 1 and
2 processes take the same step, --resume continues exactly, and final/ records the setting and loads."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoint import check_out_dir, load_config, load_model, run_settings
from conftest import one_error_line, snapshot, tiny_llama, write_hf_llama
from convert_llama import convert
from test_train import L, log, ok, setup, train  # noqa: F401 (setup: the fixture of the tiny checkpoint and flags)
from train import Sequences, get_args, pose_position_ids

S = 2 * L  # --scale 2 (setup's flags): the context s·L that the position ids span
POSE = ["--pose", "--seq-len", "32"]  # windows of a quarter of s·L


def chunks(ids):
    """The runs of consecutive ids, as (first id, length)."""
    cuts = [0, *(torch.nonzero(ids.diff() != 1).flatten() + 1).tolist(), len(ids)]
    return [(int(ids[a]), b - a) for a, b in zip(cuts, cuts[1:])]


# ----------------------------------------------------------------------------- the position ids

@pytest.mark.parametrize("seq_len, context", [(2, 2), (2, 3), (7, 50), (32, 128), (100, 100), (128, 1024)])
def test_pose_ids_increase_from_0_in_two_chunks_below_the_context(seq_len, context):
    lasts, firsts = [], set()
    for p in range(300):
        ids = pose_position_ids(seq_len, context, np.random.default_rng([0, p, 1]))
        assert ids.shape == (seq_len,) and ids.dtype == torch.int64
        assert ids[0] == 0 and (ids.diff() >= 1).all() and ids[-1] < context, ids
        parts = chunks(ids)
        assert len(parts) <= 2  # the paper's N = 2; one chunk when the skip drawn is 0
        if len(parts) == 2:
            firsts.add(parts[0][1])
            assert 1 <= parts[0][1] <= (seq_len + 1) // 2  # the first chunk: 1..ceil(seq_len/2) tokens
        lasts.append(int(ids[-1]))
    if seq_len == context:  # nothing to skip
        assert lasts == [seq_len - 1] * 300
    else:  # the longest distance in a window, ids[-1] - ids[0], covers seq_len - 1 .. context - 1
        spread = (context - seq_len) // 10
        assert max(lasts) >= context - 1 - spread and min(lasts) <= seq_len - 1 + spread
    if (seq_len, context) == (32, 128):
        assert firsts == set(range(1, 17))


def test_a_sequence_gets_the_same_ids_on_any_number_of_processes_and_after_a_resume():
    tokens = np.arange(10 * 8, dtype=np.uint32)  # 10 sequences of 8 tokens
    data = Sequences(tokens, "key", seq_len=8, seed=3, pose_context=40)

    def ids(data, step, world, micro_batch_size, batch_size=4):  # the global batch, in stream order
        accum = batch_size // (world * micro_batch_size)
        return torch.cat([data.position_ids(step, m, r, world, micro_batch_size, batch_size)
                          for m in range(accum) for r in range(world)])

    resumed = Sequences(tokens, "key", seq_len=8, seed=3, pose_context=40)  # a new process, as after --resume
    for step in range(6):  # 24 sequences: past the first epoch
        assert torch.equal(ids(data, step, 1, 4), ids(data, step, 2, 1))
        assert torch.equal(ids(data, step, 1, 4), ids(data, step, 4, 1))
        assert torch.equal(ids(data, step, 2, 2), ids(resumed, step, 2, 2))
    draws = torch.cat([ids(data, step, 1, 4) for step in range(6)])
    # each sequence its own draw, epoch after epoch (of 4 x 33 possible ones: some coincide)
    assert len({tuple(row.tolist()) for row in draws}) > len(draws) // 2
    assert not torch.equal(ids(data, 0, 1, 4), ids(Sequences(tokens, "key", 8, seed=4, pose_context=40), 0, 1, 4))
    assert Sequences(tokens, "key", seq_len=8, seed=3).position_ids(0, 0, 0, 1, 4, 4) is None  # no --pose


# ----------------------------------------------------------------------------- the model at explicit positions

@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
                                          {"rope_type": "dynamic-yarn", "factor": 2.0,
                                           "original_max_position_embeddings": 64}], ids=["default", "yarn", "dynamic"])
def test_the_model_at_positions_0_to_t_is_the_model_without_positions_exactly(rope_scaling):
    model = tiny_llama(rope_scaling=rope_scaling, max_position_embeddings=128)
    tokens = torch.randint(0, 258, (2, 100), generator=torch.Generator().manual_seed(0))
    arange = torch.arange(100).expand(2, 100)
    with torch.no_grad():
        assert torch.equal(model.nll(tokens, tokens, positions=arange), model.nll(tokens, tokens))
        assert torch.equal(model.hidden(tokens, positions=arange), model.hidden(tokens))
    grads = []
    model.activation_checkpointing = True  # as in training
    for positions in (None, arange):
        model.zero_grad()
        model.nll(tokens, tokens, chunk_size=64, positions=positions).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_model_at_skipped_positions_matches_transformers_position_ids(tmp_path):
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}
    hf = write_hf_llama(tmp_path / "hf", params, max_position_embeddings=4 * L)
    convert(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    tokens = torch.randint(0, 320, (3, 50), generator=torch.Generator().manual_seed(1))
    positions = torch.stack([pose_position_ids(50, 4 * L, np.random.default_rng([0, p, 1])) for p in range(3)])
    assert positions[:, -1].max() > 3 * L  # far past L
    with torch.no_grad():
        got = ours.head(ours.hidden(tokens, positions=positions))
        assert (got - hf(tokens, position_ids=positions).logits).abs().max() <= 1e-4
        assert (got - ours(tokens)).abs().max() > 1e-2  # the skips change the numbers


# ----------------------------------------------------------------------------- training runs

def test_with_nothing_to_skip_pose_is_the_run_without_it(setup):
    """--seq-len = s·L (the default): every window already spans the context, so the ids are 0..T-1."""
    root, flags = setup
    ok(train(flags + ["--steps", "2"], root / "plain"))
    ok(train(flags + ["--steps", "2", "--pose"], root / "pose_full"))
    assert [r["loss"] for r in log(root / "plain")] == [r["loss"] for r in log(root / "pose_full")]
    a, b = (load_file(root / run / "final" / "model.safetensors") for run in ("plain", "pose_full"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_and_two_processes_take_the_same_pose_step(setup):
    """As test_train's test_one_and_two_processes_take_the_same_step, with --pose on 32-token windows of s·L = 128."""
    root, flags = setup
    flags = flags + ["--steps", "1", "--lr", "2e-4", "--seq-len", "32"]
    ok(train(flags + ["--pose", "--micro-batch-size", "2"], root / "pose_one"))
    ok(train(flags + ["--pose"], root / "pose_two", nproc=2))
    ok(train(flags + ["--micro-batch-size", "2"], root / "no_pose"))
    (a,), (b,) = log(root / "pose_one"), log(root / "pose_two")
    assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"]
    wa, wb, wc = (load_file(root / run / "final" / "model.safetensors") for run in ("pose_one", "pose_two", "no_pose"))
    assert all((wa[k] - wb[k]).abs().max() <= 1e-5 for k in wa)
    # the same tokens at other positions: some gradients change sign, and AdamW's first step moves those weights
    # by 2·lr the other way (the loss of a random model barely depends on positions: it is ~ln(vocab) either way)
    assert all((wa[k] - wc[k]).abs().max() > 1e-4 for k in wa if ".wq." in k or ".wk." in k)


@pytest.fixture(scope="module")
def pose_straight(setup):
    """Four --pose steps on two processes, a checkpoint every two."""
    root, flags = setup
    ok(train(flags + POSE + ["--steps", "4", "--save-every", "2"], root / "pose_straight", nproc=2))
    return root / "pose_straight"


def test_resume_with_pose_reproduces_the_uninterrupted_run_exactly(setup, pose_straight):
    root, flags = setup
    flags = flags + POSE + ["--save-every", "2"]
    ok(train(flags + ["--steps", "2"], root / "pose_resumed", nproc=2))
    result = ok(train(flags + ["--steps", "4", "--resume"], root / "pose_resumed", nproc=2))
    assert "resuming after step 2" in result.stdout
    assert [r["loss"] for r in log(root / "pose_resumed")] == [r["loss"] for r in log(pose_straight)]
    a = load_file(pose_straight / "final" / "model.safetensors")
    b = load_file(root / "pose_resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_final_records_pose_as_a_training_setting_and_loads(setup, pose_straight, tmp_path):
    raw = json.loads((pose_straight / "final" / "config.json").read_text())
    assert raw["training"] == {"pose": True, "seq_len": 32, "scale": 2.0, "rope": "yarn"}
    assert json.loads((pose_straight / "run.json").read_text())["pose"] is True
    config = load_config(pose_straight / "final")  # "training" sets nothing: the config is the plain run's
    assert config.max_position_embeddings == S and config.rope_scaling["factor"] == 2.0
    model = load_model(pose_straight / "final")
    hf = json.loads((pose_straight / "hf" / "config.json").read_text())  # the export ignores it
    assert "training" not in hf and hf["max_position_embeddings"] == S and hf["rope_scaling"]["factor"] == 2.0
    convert(pose_straight / "final", tmp_path / "hf")
    assert load_file(tmp_path / "hf" / "model.safetensors").keys() == load_file(pose_straight / "hf" /
                                                                                  "model.safetensors").keys()
    assert model.config == config


def test_resume_must_repeat_pose(setup, pose_straight):
    before = snapshot(pose_straight)
    flags = setup[1] + ["--seq-len", "32", "--steps", "6", "--save-every", "2", "--resume"]
    one_error_line(train(flags, pose_straight), "train.py", "--pose True -> False")
    assert snapshot(pose_straight) == before


def test_a_run_from_before_pose_still_resumes(tmp_path):
    """Its run.json has no "pose": it trained without PoSE."""
    args = get_args(["--resume", "--out-dir", str(tmp_path)])
    (tmp_path / "run.json").write_text(json.dumps({k: v for k, v in run_settings(args).items() if k != "pose"}))
    assert check_out_dir(tmp_path, args) == 0  # no checkpoint yet, and no settings changed
    args.pose = True
    with pytest.raises(ValueError, match="--pose False -> True"):
        check_out_dir(tmp_path, args)


def test_pose_with_windows_longer_than_the_context_is_refused(setup, tmp_path):
    result = train(setup[1] + ["--pose", "--seq-len", str(S + 1)], tmp_path / "out")
    one_error_line(result, "train.py", f"--seq-len {S + 1} is longer", f"s x L = {S}")
    assert not (tmp_path / "out").exists()


def test_the_study_names_each_flag_of_a_command_once():
    """python -m tools.study --list prints the commands a reader copies: the PoSE fine-tune replaces the recipe's
    --seq-len and --batch-size instead of repeating them (argparse would take the last, a reader might not)."""
    from tools import study

    for step in study.STEPS:
        flags = [x for x in step["command"] if x.startswith("--")]
        assert len(flags) == len(set(flags)), step["command"]
    (pose,) = [s["command"] for s in study.STEPS if s.get("run") == "yarn-pose"]
    assert pose[pose.index("--seq-len") + 1] == "2048" and "--pose" in pose
