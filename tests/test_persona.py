"""Persona vectors from a system prompt (vsteer.extraction.from_prompt) and the persona experiment."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import VOCAB, make_tiny_model

from vsteer.encoding import token_ids
from vsteer.errors import DataError
from vsteer.experiments.persona import PersonaConfig, run_persona
from vsteer.extraction import from_prompt, prompt_inputs, system_prompt_mode
from vsteer.hooks import capture
from vsteer.vectors import SteeringVector

WORDS = ["system", "user", "assistant", ":", "you", "are", "a", "pirate", "scientist", "think", "step"]
PROMPT = "you are a pirate"
CHAT = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
# a template without a system role (like Mistral's or Gemma 2's): it refuses one
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
# Gemma 3's way: the system text goes into the first user turn
MERGING = (
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
    "{% for m in messages %}{{ m['role'] }} : {{ (first if loop.first else '') + m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def word_tokenizer(template: str | None = CHAT):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in WORDS + [f"w{i}" for i in range(VOCAB - 4 - len(WORDS))]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = template
    return fast


def questions(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(
            f"w{int(i)}"
            for i in torch.randint(0, 60, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]


def hand_from_prompt(model, tok, prompt, qs, layer, k):
    """One question at a time, no padding: mean v over the last k tokens, with minus without."""
    diffs = []
    for q in qs:
        feats = []
        for msgs in (
            [{"role": "system", "content": prompt}, {"role": "user", "content": q}],
            [{"role": "user", "content": q}],
        ):
            ids = torch.tensor([token_ids(tok, msgs)])
            with torch.no_grad(), capture(model, [("v", layer)]) as acts:
                model(input_ids=ids)
            feats.append(acts[("v", layer)][0, -k:].float().mean(0))
        diffs.append(feats[0] - feats[1])
    return torch.stack(diffs).mean(0)


# ---- from_prompt -----------------------------------------------------------------------------
def test_from_prompt_equals_the_hand_computed_mean_difference():
    model, tok = make_tiny_model("llama"), word_tokenizer()
    qs = questions(5)
    vec = from_prompt(model, tok, PROMPT, qs, site="v", layers=[1], batch_size=2)
    # tail = "assistant :" (2 tokens) + the question's last token
    assert vec.position == "last:3" and vec.extra["n_last"] == 3
    torch.testing.assert_close(vec[1], hand_from_prompt(model, tok, PROMPT, qs, 1, 3), atol=1e-5, rtol=1e-4)
    assert vec.site == "v" and vec.shape == (2, 8)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "gpt_neox"])
def test_from_prompt_batched_equals_row_by_row(family):
    model, tok = make_tiny_model(family), word_tokenizer()
    qs = questions(6, seed=3)  # different lengths: left padding differs per batch
    one = from_prompt(model, tok, PROMPT, qs, site="v", layers="0-2", batch_size=1)
    many = from_prompt(model, tok, PROMPT, qs, site="v", layers="0-2", batch_size=4)
    for layer in one.layers:
        torch.testing.assert_close(one[layer], many[layer], atol=1e-5, rtol=1e-4)


def test_from_prompt_metadata_records_the_prompt_and_the_question_hash(tmp_path):
    model, tok = make_tiny_model("llama"), word_tokenizer()
    qs = questions(4)
    vec = from_prompt(model, tok, PROMPT, qs, layers=[2], position="last")
    assert vec.extra["system_prompt"] == PROMPT and vec.extra["prompt_mode"] == "system"
    assert vec.extra["questions_sha256"] == hashlib.sha256(json.dumps(qs).encode()).hexdigest()
    assert vec.position == "last:1"
    vec.save(tmp_path / "p.safetensors")
    back = SteeringVector.load(tmp_path / "p.safetensors", model)
    assert back.extra["system_prompt"] == PROMPT
    torch.testing.assert_close(back[2], vec[2])


def test_a_template_without_a_system_role_gets_the_prompt_in_the_first_user_turn():
    tok = word_tokenizer(NO_SYSTEM)
    assert system_prompt_mode(tok, PROMPT) == "first_user_turn"
    with_ids, without = prompt_inputs(tok, PROMPT, "w1 w2", "first_user_turn")
    assert tok.decode(with_ids) == "user : you are a pirate w1 w2 assistant :"
    assert tok.decode(without) == "user : w1 w2 assistant :"
    vec = from_prompt(make_tiny_model("llama"), tok, PROMPT, questions(3), layers=[1])
    assert vec.extra["prompt_mode"] == "first_user_turn"


def test_a_template_that_merges_the_system_text_itself_is_recorded_as_first_user_turn():
    tok = word_tokenizer(MERGING)
    assert system_prompt_mode(tok, PROMPT) == "first_user_turn"


def test_no_chat_template_means_plain_text():
    tok = word_tokenizer(None)
    assert system_prompt_mode(tok, PROMPT) == "plain_text"
    vec = from_prompt(make_tiny_model("llama"), tok, PROMPT, questions(3), layers=[1])
    assert vec.extra["prompt_mode"] == "plain_text" and vec.position == "last:1"


def test_from_prompt_bad_input_is_one_line():
    model, tok = make_tiny_model("llama"), word_tokenizer()
    with pytest.raises(DataError, match="non-empty string"):
        from_prompt(model, tok, "  ", questions(2), layers=[1])
    with pytest.raises(DataError, match="unknown questions"):
        from_prompt(model, tok, PROMPT, "no-such-questions", layers=[1])
    with pytest.raises(Exception, match="position"):
        from_prompt(model, tok, PROMPT, questions(2), layers=[1], position=0)


# ---- the experiment: a planted effect ----------------------------------------------------------
def planted_model(tok, layer: int = 1, seed: int = 0):
    """A tiny llama in which the system prompt's whole effect is a value-site shift at ``layer``:
    a pre-hook strips the system turn from each row (re-padding on the left, same width) and flags
    the row; a hook on ``layer``'s value projection adds ``c`` to flagged rows at every position."""
    model = make_tiny_model("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions, so the prompt's KL is large
    c = torch.randn(2 * 8, generator=torch.Generator().manual_seed(11)) * 3.0
    system, user = tok.convert_tokens_to_ids("system"), tok.convert_tokens_to_ids("user")
    flags = {"rows": None}

    def strip(module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None or ids.shape[1] == 1:
            return None
        mask = torch.ones_like(ids) if mask is None else mask
        rows, new_ids, new_mask, flagged = [], [], [], []
        for row, m in zip(ids, mask):
            real = row[m.bool()].tolist()
            hit = bool(real) and real[0] == system
            if hit:
                real = real[real.index(user) :]
            width = ids.shape[1]
            new_ids.append([0] * (width - len(real)) + real)
            new_mask.append([0] * (width - len(real)) + [1] * len(real))
            flagged.append(hit)
            rows.append(real)
        kwargs["input_ids"] = torch.tensor(new_ids)
        kwargs["attention_mask"] = torch.tensor(new_mask)
        kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        flags["rows"] = torch.tensor(flagged, dtype=torch.float32)
        return args, kwargs

    def shift(module, args, output):
        if flags["rows"] is None or flags["rows"].shape[0] != output.shape[0]:
            return None
        return output + flags["rows"][:, None, None] * c

    model.register_forward_pre_hook(strip, with_kwargs=True)
    model.model.layers[layer].self_attn.v_proj.register_forward_hook(shift)
    return model, c.reshape(2, 8)


def test_planted_value_shift_is_extracted_exactly():
    tok = word_tokenizer()
    model, c = planted_model(tok)
    vec = from_prompt(model, tok, PROMPT, questions(4), layers=[1])
    torch.testing.assert_close(vec[1], c, atol=1e-4, rtol=1e-4)


def test_planted_value_shift_is_recovered_and_a_random_vector_is_not():
    tok = word_tokenizer()
    model, _ = planted_model(tok)
    config = PersonaConfig(
        prompts=(PROMPT,),
        n_extract=6,
        n_select=3,
        n_test=8,
        layer_fractions=(0.5,),  # layer 1 of 3
        scales=(1.0, 2.0),
        n_positions=1,
        max_question_tokens=8,
        batch_size=4,
        n_boot=200,
    )
    result = run_persona(model, tok, config, questions=questions(40, seed=5), progress_bar=False)
    rows = {(r["prompt"], r["arm"]): r for r in result.records}
    v, rand = rows[(PROMPT, "v")], rows[(PROMPT, "random")]
    assert v["layer"] == 1 and v["scale"] == 1.0
    assert v["recovery"] > 0.99 and v["kl_prompt"] > 0.05
    assert rand["recovery"] < 0.5
    effects = {f.rule_id: f.effect for f in result.findings}
    assert effects["persona.v_recovers"].low > 0.99
    assert effects["persona.v_vs_random"].value > 0.5


def test_an_unplanted_prompt_is_not_recovered_by_construction():
    """The control of the planted test: on a plain random model the prompt's effect is attention to
    new tokens, which one vector need not reproduce; recovery must stay well below the planted 1."""
    tok = word_tokenizer()
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    config = PersonaConfig(
        prompts=(PROMPT,), n_extract=6, n_select=3, n_test=8, layer_fractions=(0.5,), scales=(1.0,),
        n_positions=2, max_question_tokens=8, batch_size=4, n_boot=200,
    )  # fmt: skip
    result = run_persona(model, tok, config, questions=questions(40, seed=5), progress_bar=False)
    v = next(r for r in result.records if r["arm"] == "v" and r["prompt"] == PROMPT)
    assert v["recovery"] < 0.9


# ---- command line ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--from-prompt", "  ", "--questions", "hh-rlhf:helpful"], "non-empty system prompt"),
        (["--from-prompt", "You are a pirate."], "needs --questions"),
        (["--questions", "hh-rlhf:helpful"], "goes with --from-prompt"),
        (["--from-prompt", "P", "--questions", "hh-rlhf:helpful", "--data", "sst2"], "not both"),
        (["--from-prompt", "P", "--questions", "missing.jsonl"], "unknown questions 'missing.jsonl'"),
        (["--from-prompt", "P", "--questions", "hh-rlhf:helpful", "--position", "x"], "position"),
        (
            ["--from-prompt", "P", "--questions", "hh-rlhf:helpful", "--method", "pca"],
            "unknown extraction method",
        ),
        ([], "needs --data"),
    ],
)
def test_cli_from_prompt_bad_input_is_one_line_and_keeps_the_old_file(
    tmp_path, capsys, monkeypatch, argv, message
):
    from vsteer.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "old.safetensors"
    out.write_bytes(b"keep me")
    assert main(["extract", *argv, "--model", "no-such-model", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert out.read_bytes() == b"keep me"


def test_cli_questions_file_without_a_question_field_is_one_line(tmp_path, capsys):
    from vsteer.cli import main

    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "hi"}\n{"answer": "no"}\n')
    assert (
        main(["extract", "--from-prompt", "P", "--questions", str(path), "--model", "x", "-o", "v.st"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "q.jsonl line 2: no question/prompt/text field" in err


@pytest.mark.slow
def test_cli_from_prompt_on_the_embedded_model_writes_a_loadable_vector(tmp_path, capsys):
    from vsteer.cli import main
    from vsteer.models import load_model

    out = tmp_path / "pirate.safetensors"
    argv = ["extract", "--from-prompt", "You are a pirate.", "--questions", "hh-rlhf:helpful", "--limit", "4"]
    assert main([*argv, "--site", "v", "--layers", "10-11", "--out", str(out)]) == 0
    assert "from 4 questions" in capsys.readouterr().out
    model, _ = load_model("smollm2-135m-instruct")
    vec = SteeringVector.load(out, model)
    assert vec.layers == [10, 11] and vec.site == "v" and vec.extra["system_prompt"] == "You are a pirate."
    assert vec.extra["prompt_mode"] == "system" and vec.position == "last:7"
    assert all(n > 0 for n in vec.norms().values())


def test_the_persona_section_is_registered_with_sizes_in_every_profile():
    from vsteer.run import SECTION_TABLE, _make_config, load_profile

    assert SECTION_TABLE["persona"][1:] == ("PersonaConfig", "run_persona")
    for profile in ("smoke", "cpu", "full"):
        config = _make_config("persona", load_profile(profile)["persona"])
        assert isinstance(config, PersonaConfig) and config.prompts and isinstance(config.scales, tuple)
