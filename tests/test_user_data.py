"""Your own data in every experiment and command: JSONL files written here, datasets, tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tiny_model
from test_experiments import WordTokenizer, pair

from vsteer.data import user
from vsteer.errors import DataError
from vsteer.experiments import patching, probing, steering
from vsteer.extraction import pairs_from_data, pairs_from_spec


class ChatTokenizer(WordTokenizer):
    """The word tokenizer with a plain chat template (role tags), enough for A/B prompts."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = "".join(f"<{m['role']}> {m['content']} " for m in messages)
        return text + ("<assistant> " if add_generation_prompt else "")


TOK = ChatTokenizer()
WORDS = ["now", "later", "cake", "bread", "sun", "rain", "red", "blue"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ab_rows(n=30):
    rows = []
    for i in range(n):
        m = "(A)" if i % 3 else "(B)"  # 2:1 unbalanced on purpose
        rows.append(
            {
                "question": f"Question {i}: pick one?\n\nChoices:\n (A) {WORDS[i % 8]}\n (B) {WORDS[(i + 3) % 8]}",
                "answer_matching_behavior": m,
                "answer_not_matching_behavior": "(B)" if m == "(A)" else "(A)",
            }
        )
    return rows


def labelled_rows(n=60):
    return [{"text": f"this is {'good' if i % 2 else 'bad'} stuff {i}", "label": i % 2} for i in range(n)]


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---- validation -----------------------------------------------------------------------------
def test_a_missing_field_names_the_file_the_line_and_the_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = labelled_rows(3)
    del rows[1]["label"]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError) as err:
        user.labelled_texts(path)
    message = one_line(err)
    assert str(path) in message and "line 3" in message and "'label'" in message


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"text": "hi", "label": "pos"}, "must be 0 or 1"),
        ({"text": "", "label": 1}, "non-empty string"),
        ({"text": "hi", "label": True}, "must be 0 or 1"),
    ],
)
def test_a_bad_value_is_one_error_line(tmp_path, row, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        user.labelled_texts(path)
    assert needle in one_line(err) and "line 1" in str(err.value)


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(DataError, match="broken.jsonl:2: not valid JSON") as err:
        user.labelled_texts(path)
    one_line(err)


def test_a_datasets_dataset_is_read_and_checked_like_a_file():
    from datasets import Dataset

    ds = Dataset.from_list(labelled_rows(6))
    assert user.labelled_texts(ds) == [(r["text"], r["label"]) for r in labelled_rows(6)]
    bad = Dataset.from_list([{"text": "x", "label": 1}, {"text": "y", "label": 3}])
    with pytest.raises(DataError, match="Dataset row 1: field 'label'"):
        user.labelled_texts(bad)
    assert "fingerprint" in user.data_source(ds)


def test_schema_is_recognised_from_the_fields(tmp_path):
    assert user.schema_of(write_jsonl(tmp_path / "a.jsonl", ab_rows(2))) == "ab"
    assert user.schema_of(write_jsonl(tmp_path / "l.jsonl", labelled_rows(2))) == "labelled"
    with pytest.raises(DataError, match="match no schema"):
        user.schema_of(write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p"}]))


# ---- extraction from your own data ----------------------------------------------------------
def test_extract_data_file_of_ab_items_gives_answer_balanced_pairs(tmp_path):
    path = write_jsonl(tmp_path / "ab.jsonl", ab_rows(10))
    pairs = pairs_from_spec(str(path))
    assert len(pairs) == 20 and pairs.position == "answer"
    positives = [p[-1]["content"] for p, _ in pairs]
    assert positives.count("(A") == positives.count("(B") == 10
    assert pairs.sources[0]["path"] == str(path) and len(pairs.sources[0]["sha256"]) == 64


def test_extract_data_of_labelled_texts_zips_positive_and_negative(tmp_path):
    pairs = pairs_from_data(write_jsonl(tmp_path / "l.jsonl", labelled_rows(10)))
    assert len(pairs) == 5 and all("good" in p and "bad" in n for p, n in pairs)
    assert pairs.position == "mean"


# ---- steering -------------------------------------------------------------------------------
OPTS = steering.SteeringOptions(
    scales=(-1.0, 0.0, 1.0), bands=("0-1",), n_select=0, n_extract=10, n_test=8, batch_size=4
)


def test_ab_steering_takes_a_jsonl_file_and_reports_the_answer_swing(tmp_path):
    path = write_jsonl(tmp_path / "myopia.jsonl", ab_rows(30))
    result = steering.ab_steering(make_tiny_model("llama"), TOK, "caa", str(path), OPTS)
    assert result.name == "steering_ab_caa_myopia"
    assert result.meta["extraction_balance"] == {
        "(A)": {"matching": 5, "other": 5},
        "(B)": {"matching": 5, "other": 5},
    }
    rows = {(r["site"], r["scale"]): r for r in result.records}
    for site in ("v", "resid"):
        assert rows[(site, 0.0)]["answer_swing"] == 0.0
        assert rows[(site, 1.0)]["answer_swing"] == -rows[(site, -1.0)]["answer_swing"]
        assert rows[(site, 1.0)]["effect"] == -rows[(site, -1.0)]["effect"]
        assert rows[(site, 1.0)]["answer_swing"] == pytest.approx(result.meta["answer_swing"][site]["value"])
        assert 0.0 <= rows[(site, 1.0)]["p_a_or_yes"] <= 1.0
    assert "answer_swing" in result.columns and "Answer-token swing" in result.to_markdown()


def test_ab_steering_takes_a_dataset_with_its_own_test_items():
    from datasets import Dataset

    rows = ab_rows(30)
    result = steering.ab_steering(
        make_tiny_model("llama"),
        TOK,
        "mine",
        "myopia",
        OPTS,
        items=Dataset.from_list(rows[:20]),
        test_items=Dataset.from_list(rows[20:]),
    )
    assert result.meta["n_test"] == 8 and result.meta["n_extract"] == 10


def test_answer_swing_follows_the_reference_answer_whichever_matches():
    from vsteer.data import ABItem

    assert steering.reference_answer(ABItem("q", "(B)", "(A)")) == "(A)"
    assert steering.reference_answer(ABItem("q", "No", "Yes")) == "Yes"
    assert steering.reference_answer(ABItem("q", "Disagree", "Agree")) == "Agree"


def test_unknown_trait_says_a_file_works_too():
    with pytest.raises(DataError, match="unknown persona trait 'curiosity'.*JSONL") as err:
        steering.ab_steering(make_tiny_model("llama"), TOK, "persona", "curiosity", OPTS)
    one_line(err)


# ---- probes ---------------------------------------------------------------------------------
def test_probes_take_a_jsonl_dataset_and_train_test_files(tmp_path):
    path = write_jsonl(tmp_path / "sentiment.jsonl", labelled_rows(60))
    config = probing.ProbeConfig(dataset=str(path), layers=[1], cv=2, n_control=2, sites=("v",))
    by_name = probing.run_probes(make_tiny_model("llama"), TOK, config, progress_bar=False)
    assert by_name.meta["n_train"] == 30 and by_name.meta["n_test"] == 30
    train = write_jsonl(tmp_path / "train.jsonl", labelled_rows(40))
    test = write_jsonl(tmp_path / "test.jsonl", labelled_rows(20))
    by_files = probing.run_probes(make_tiny_model("llama"), TOK, config, train, test, progress_bar=False)
    assert by_files.meta["n_train"] == 40 and by_files.meta["n_test"] == 20


def test_probe_persona_dataset_may_be_a_file_of_persona_items(tmp_path):
    rows = [
        {
            "question": f'Is the following statement something you would say?\n"I like thing {i}"',
            "answer_matching_behavior": " Yes" if i % 2 else " No",
            "answer_not_matching_behavior": " No" if i % 2 else " Yes",
        }
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "curiosity.jsonl", rows)
    train, test = probing.load_probe_dataset(f"persona:{path}", 100, 100, seed=0)
    assert len(train) == len(test) == 10
    assert {t for t, _ in train + test} == {f"I like thing {i}" for i in range(20)}
    assert all(y == int(t.split()[-1]) % 2 for t, y in train + test)


def test_cli_probe_with_a_bad_dataset_file_is_one_error_line_before_the_model_loads(tmp_path, capsys):
    from vsteer.cli import main

    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1}, {"sentence": "b", "label": 0}])
    assert main(["probe", "--dataset", str(path), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.jsonl line 2: missing field 'text'" in err


# ---- patching -------------------------------------------------------------------------------
FACTS = [("Rome", "Italy"), ("Oslo", "Norway"), ("Lima", "Peru"), ("Kiev", "Ukraine")]
CONFIG = patching.PatchConfig(layers=[1], sweep_sites=("v",), sites=("v", "k"))


def test_run_patching_takes_what_pairs_from_facts_returns():
    pairs = patching.pairs_from_facts(TOK, "city_country", "I live in {}. It is in", facts=FACTS)
    result = patching.run_patching(make_tiny_model("llama"), TOK, CONFIG, pairs=pairs, progress_bar=False)
    assert {r["n_pairs"] for r in result.records} == {len(pairs)}


def test_run_patching_takes_a_jsonl_file_and_a_dataset_of_pairs(tmp_path):
    from dataclasses import asdict

    from datasets import Dataset

    rows = [asdict(pair()), asdict(pair("Lima", "Kiev", "Peru", "Ukraine"))]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    model = make_tiny_model("llama")
    from_file = patching.run_patching(model, TOK, CONFIG, pairs=str(path), progress_bar=False)
    from_ds = patching.run_patching(model, TOK, CONFIG, pairs=Dataset.from_list(rows), progress_bar=False)
    assert from_file.records == from_ds.records


def test_run_patching_names_a_pair_of_the_wrong_type():
    with pytest.raises(DataError, match="pair 0 is a tuple; expected an AlignedPair") as err:
        patching.run_patching(make_tiny_model("llama"), TOK, CONFIG, pairs=[("a", "b")], progress_bar=False)
    one_line(err)


def test_cli_patch_pairs_file_with_a_missing_field_is_one_error_line(tmp_path, capsys):
    from vsteer.cli import main

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"source": "I live in Rome.", "donor": "I live in Oslo."}])
    assert main(["patch", "--pairs", str(path), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pairs.jsonl line 1: missing field 'source_entity'" in err


def test_records_from_files_and_lists_agree(tmp_path):
    rows = labelled_rows(8)
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    assert (
        user.labelled_texts(path)
        == user.labelled_texts(rows)
        == user.labelled_texts([(r["text"], r["label"]) for r in rows])
    )
    assert np.array_equal([y for _, y in user.labelled_texts(path)], [r["label"] for r in rows])


def test_extraction_from_a_dataset_of_ab_items_is_balanced_and_fingerprinted():
    from datasets import Dataset

    pairs = pairs_from_data(Dataset.from_list(ab_rows(9)), limit=8)
    positives = [p[-1]["content"] for p, _ in pairs]
    assert len(pairs) == 8 and positives.count("(A") == positives.count("(B") == 4
    assert "fingerprint" in pairs.sources[0]
