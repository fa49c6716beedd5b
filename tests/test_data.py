"""The shipped datasets: counts, fields, held-out splits, facts, and one-line errors for bad names."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

import vsteer.data as data
from vsteer.errors import DataError, VsteerError

DATA_DIR = Path(data.__file__).parent


def manifest() -> dict[str, str]:
    lines = (DATA_DIR / "SHA256SUMS").read_text().splitlines()
    return {rel: digest for digest, rel in (line.split("  ", 1) for line in lines)}


def assert_one_line_error(call, *needles):
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert isinstance(info.value, VsteerError) and isinstance(info.value, ValueError)


# ---- the package's files ----


def test_every_shipped_file_matches_its_manifest_hash():
    listed = manifest()
    for rel, digest in listed.items():
        assert data.file_sha256(DATA_DIR / rel) == digest, rel


def test_every_data_file_is_in_the_manifest():
    listed = set(manifest())
    on_disk = {
        p.relative_to(DATA_DIR).as_posix()
        for p in DATA_DIR.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    }
    assert on_disk - {"SHA256SUMS", "SOURCES.md"} == listed


def test_every_data_folder_has_a_licence():
    for folder in (
        "sst2",
        "caa",
        "anthropic-evals",
        "repeng",
        "wikitext-2-raw",
        "facts/uci-zoo",
        "facts/google-analogy",
    ):
        assert (DATA_DIR / folder / "LICENSE").is_file(), folder
    assert (DATA_DIR / "imdb" / "README").is_file()  # IMDB has no licence; its README asks for a citation


def test_shipped_data_stays_small():
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 6_000_000


def test_wikitext_copy_is_byte_identical_to_upstream():
    assert data.file_sha256("wikitext-2-raw/wiki.test.raw") == (
        "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    )


def test_data_path_finds_compressed_files_without_their_suffix():
    path = data.data_path("sst2/stsa.binary.dev")
    assert path.is_absolute() and path.name == "stsa.binary.dev.gz"
    assert data.data_path("repeng/all_truncated_outputs.json").suffix == ".json"


def test_file_sha256_hashes_decompressed_content():
    path = data.data_path("sst2/stsa.binary.dev")
    assert data.file_sha256(path) == hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def test_data_path_rejects_missing_and_escaping_paths():
    assert_one_line_error(lambda: data.data_path("nope/missing.txt"), "nope/missing.txt")
    assert_one_line_error(lambda: data.data_path("../errors.py"), "outside")


# ---- CAA and MMLU ----


@pytest.mark.parametrize(
    "behaviour,count",
    [
        ("coordinate-other-ais", 360),
        ("corrigible-neutral-HHH", 290),
        ("hallucination", 1000),
        ("myopic-reward", 950),
        ("refusal", 408),
        ("survival-instinct", 903),
        ("sycophancy", 1000),
    ],
)
def test_caa_generate_and_test_counts(behaviour, count):
    assert len(data.caa_ab(behaviour)) == count
    assert len(data.caa_ab(behaviour, "test")) == 50


def test_caa_answers_are_stripped_letters_with_nonempty_questions():
    for behaviour in data.caa_behaviours():
        for split in ("generate", "test"):
            for item in data.caa_ab(behaviour, split):
                assert item.question.strip()
                assert item.matching != item.not_matching
                for answer in (item.matching, item.not_matching):
                    assert len(answer) == 3 and answer[0] == "(" and answer[2] == ")", answer


def test_only_survival_instinct_has_answers_beyond_b():
    beyond = {
        (b, split): sum(i.matching not in ("(A)", "(B)") for i in data.caa_ab(b, split))
        for b in data.caa_behaviours()
        for split in ("generate", "test")
    }
    assert beyond.pop(("survival-instinct", "generate")) == 88
    assert beyond.pop(("survival-instinct", "test")) == 4
    assert set(beyond.values()) == {0}


def test_mmlu_matching_is_the_correct_letter():
    items = data.mmlu_ab()
    assert len(items) == 570
    assert {i.matching for i in items} | {i.not_matching for i in items} == {"(A)", "(B)"}
    assert all("Choices:" in i.question for i in items)


def test_caa_rejects_unknown_behaviour_and_split():
    assert_one_line_error(lambda: data.caa_ab("flattery"), "'flattery'", "sycophancy")
    assert_one_line_error(lambda: data.caa_ab("refusal", "train"), "'train'", "generate, test")


# ---- persona ----


@pytest.mark.parametrize(
    "trait", ["agreeableness", "conscientiousness", "extraversion", "neuroticism", "openness"]
)
def test_persona_items_are_balanced_yes_no(trait):
    items = data.persona_ab(trait)
    assert len(items) == 1000
    assert sum(i.matching == "Yes" for i in items) == 500
    assert all({i.matching, i.not_matching} == {"Yes", "No"} for i in items)
    assert all(i.question.startswith('Is the following statement something you would say?\n"') for i in items)


def test_persona_rejects_unknown_trait():
    assert_one_line_error(lambda: data.persona_ab("humility"), "'humility'", "openness")


def test_repeng_prefixes_are_the_582_truncated_outputs():
    prefixes = data.repeng_prefixes()
    assert len(prefixes) == 582 and len(set(prefixes)) == 582
    assert prefixes[:2] == ["", "That game"]


def test_persona_template_pairs_share_the_prefix_and_differ_in_persona():
    pairs = data.persona_template_pairs("happy", "sad", n=3)
    assert len(pairs) == 3
    positive, negative = pairs[1]
    assert [m["role"] for m in positive] == ["user", "assistant"]
    assert (
        positive[0]["content"]
        == "Pretend you're an extremely happy person making statements about the world."
    )
    assert "extremely sad person" in negative[0]["content"]
    assert positive[1] == negative[1] == {"role": "assistant", "content": "That game"}
    assert len(data.persona_template_pairs()) == 582


def test_persona_template_pairs_reject_bad_arguments():
    assert_one_line_error(lambda: data.persona_template_pairs(n=0), "1..582")
    assert_one_line_error(lambda: data.persona_template_pairs("calm", "calm"), "'calm'")
    assert_one_line_error(lambda: data.persona_template_pairs("", "sad"), "positive")


# ---- sentiment and text ----


@pytest.mark.parametrize(
    "split,count,positives", [("train", 6920, 3610), ("dev", 872, 444), ("test", 1821, 909)]
)
def test_sst2_counts_and_labels(split, count, positives):
    pairs = data.sst2(split)
    assert len(pairs) == count
    assert sum(label for _, label in pairs) == positives
    assert all(sentence and label in (0, 1) for sentence, label in pairs)


def test_sst2_rejects_unknown_split():
    assert_one_line_error(lambda: data.sst2("validation"), "'validation'", "train, dev, test")


def test_imdb_counts_and_cleaning():
    reviews = data.imdb()
    assert len(reviews) == 2000
    assert len(data.imdb(1)) == len(data.imdb(0)) == 1000
    assert len(data.imdb(1, "eval")) == len(data.imdb(0, "eval")) == 200
    assert all("<br" not in text and "  " not in text and text for text, _ in reviews)


def test_imdb_rejects_bad_label_and_split():
    assert_one_line_error(lambda: data.imdb(2), "2", "None, 0, 1")
    assert_one_line_error(lambda: data.imdb(split="test"), "'test'", "all, train, eval")


def test_neutral_prompts_are_short_distinct_held_out_openings():
    prompts = data.neutral_prompts(100)
    assert len(prompts) == len(set(prompts)) == 100
    assert all(len(p.split()) == 5 for p in prompts)
    assert prompts == data.neutral_prompts(100)
    assert_one_line_error(lambda: data.neutral_prompts(10_000), "10000")


def test_wikitext2_raw_has_the_2891_test_lines():
    lines = data.wikitext2_raw()
    assert len(lines) == 2891
    assert lines[0] == " = Robert Boulter = "
    assert all(line.strip() and "\n" not in line and "\r" not in line for line in lines)


# ---- facts ----


@pytest.mark.parametrize("relation", ["city_country", "animal_class"])
def test_facts_have_at_least_50_unique_nonempty_items(relation):
    facts = data.facts(relation)
    assert len(facts) >= 50
    assert len({f.subject for f in facts}) == len(facts)
    assert all(f.subject.strip() and f.answer.strip() for f in facts)
    assert len({f.answer for f in facts}) > 1  # patching needs pairs with different answers


def test_fact_counts_and_examples():
    cities = data.facts("city_country")
    assert len(cities) == 116
    assert data.Fact("Paris", "France") in cities and data.Fact("Tokyo", "Japan") in cities
    animals = data.facts("animal_class")
    assert len(animals) == 98
    assert data.Fact("dolphin", "mammal") in animals and data.Fact("frog", "amphibian") in animals
    assert not {"girl", "vampire"} & {f.subject for f in animals}


@pytest.mark.parametrize("relation", ["city_country", "animal_class"])
def test_relation_templates_have_one_subject_slot(relation):
    templates = data.relation_template(relation)
    assert templates and all(t.count("{}") == 1 for t in templates)
    assert data.fact_relations() == ["city_country", "animal_class"]


def test_facts_reject_unknown_relation():
    assert_one_line_error(lambda: data.facts("animal_sound"), "'animal_sound'", "city_country, animal_class")
    assert_one_line_error(lambda: data.relation_template("x"), "'x'")


# ---- training files ----


def test_sft_files_are_prompt_completion_records_from_disjoint_reviews():
    train = data.sft_records("imdb_positive_sft")
    held_out = data.sft_records("imdb_positive_sft_eval")
    assert (len(train), len(held_out)) == (783, 197)
    for record in train + held_out:
        assert set(record) == {"prompt", "completion"}
        assert len(record["prompt"].split()) == 8
        assert record["completion"].startswith(" ") and 40 <= len(record["completion"].split()) <= 48
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    eval_texts = [text for text, _ in data.imdb(1, "eval")]
    assert not any(text.startswith(r["prompt"] + r["completion"]) for r in train for text in eval_texts[:50])


def test_every_neutral_prompt_opens_a_held_out_review():
    # generic openings ("This is one of the") also start training reviews; what matters is the source
    held_out = [text for text, _ in data.imdb(split="eval")]
    assert all(any(text.split()[:5] == p.split() for text in held_out) for p in data.neutral_prompts(397))


@pytest.mark.parametrize("behaviour", data.CAA_BEHAVIOURS)
def test_dpo_files_are_conversational_and_exclude_the_test_split(behaviour):
    records = data.dpo_records(f"caa_{behaviour}_dpo")
    assert len(records) == len(data.caa_ab(behaviour, "generate"))
    test_questions = {i.question for i in data.caa_ab(behaviour, "test")}
    for record in records:
        assert set(record) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in record["prompt"]] == ["user"]
        assert record["chosen"][0]["role"] == record["rejected"][0]["role"] == "assistant"
        assert record["chosen"][0]["content"] != record["rejected"][0]["content"]
        assert record["prompt"][0]["content"] not in test_questions


def test_dpo_chosen_is_the_matching_answer():
    record = data.dpo_records("caa_sycophancy_dpo")[0]
    item = data.caa_ab("sycophancy")[0]
    assert record["prompt"][0]["content"] == item.question
    assert record["chosen"][0]["content"] == item.matching


def test_training_records_are_plain_json():
    json.dumps(data.dpo_records("caa_refusal_dpo")[:3])
    json.dumps(data.sft_records("imdb_positive_sft")[:3])


def test_training_readers_reject_unknown_names():
    assert_one_line_error(lambda: data.sft_records("yelp"), "'yelp'", "imdb_positive_sft")
    assert_one_line_error(lambda: data.dpo_records("caa_flattery_dpo"), "caa_sycophancy_dpo")


def test_editing_returned_records_does_not_change_the_next_read():
    first = data.dpo_records("caa_refusal_dpo")
    first[0]["prompt"][0]["content"] = "edited"
    assert data.dpo_records("caa_refusal_dpo")[0]["prompt"][0]["content"] != "edited"


# ---- answer-balanced extraction sets (the vector must not learn the answer token) ----


def answers_of(pairs) -> tuple[list[str], list[str]]:
    """The assistant completions of the positive and the negative side of each pair."""
    return [p[-1]["content"] for p, _ in pairs], [n[-1]["content"] for _, n in pairs]


def test_swap_options_swaps_the_option_texts_and_the_matching_letter():
    item = data.caa_ab("myopic-reward")[0]
    swapped = data.swap_options(item)
    assert (swapped.matching, swapped.not_matching) == (item.not_matching, item.matching)
    assert swapped.question.endswith("(A) Two donuts in an hour\n (B) A donut now")
    assert data.swap_options(swapped) == item


def test_swap_options_keeps_multi_line_options_whole():
    item = next(
        it for it in data.caa_ab("hallucination") if "\n\n" in it.question.split("(B)")[0].split("(A)")[-1]
    )
    a_text = item.question.split("(A)")[1].split("\n (B)")[0]
    assert data.swap_options(item).question.split("(B)")[1] == a_text


@pytest.mark.parametrize("behaviour", data.CAA_BEHAVIOURS)
def test_caa_extraction_pairs_are_exactly_letter_balanced(behaviour):
    from vsteer.extraction import caa_pairs

    for limit in (None, 40):
        pos, neg = answers_of(caa_pairs(behaviour, limit=limit))
        assert limit is None or len(pos) == limit
        for letter in set(pos) | set(neg):
            assert pos.count(letter) == neg.count(letter), (behaviour, letter)


@pytest.mark.parametrize("trait", data.PERSONA_TRAITS)
def test_persona_extraction_pairs_are_exactly_yes_no_balanced(trait):
    from vsteer.extraction import persona_pairs

    pos, neg = answers_of(persona_pairs(trait, limit=100, offset=7))
    assert len(pos) == 100 and pos.count("Yes") == pos.count("No") == neg.count("Yes") == 50
    pos, neg = answers_of(persona_pairs(trait, offset=1))  # 499 Yes and 500 No statements remain
    assert pos.count("Yes") == pos.count("No") == neg.count("Yes") == 499


@pytest.mark.parametrize(
    "kind, name",
    [("caa", b) for b in ("refusal", "myopic-reward", "corrigible-neutral-HHH", "survival-instinct")]
    + [("persona", "agreeableness"), ("persona", "neuroticism")],
)
def test_steering_extraction_sets_are_exactly_balanced(kind, name):
    from vsteer.experiments.steering import SteeringOptions, _split_items

    for n_extract in (40, 100):
        pairs, select, test = _split_items(kind, name, SteeringOptions(n_extract=n_extract, n_select=12))
        pos, neg = answers_of(pairs)
        assert len(pairs) == n_extract
        assert sorted(pos) == sorted(neg)  # every answer matches exactly as often as it is the other one
        questions = {p[0]["content"] for p, _ in pairs}
        assert not questions & {it.question for it in select + test}


def test_caa_test_set_grows_from_held_out_generate_items_without_touching_extraction():
    from vsteer.experiments.steering import SteeringOptions, _split_items

    def split(n_test):
        return _split_items("caa", "myopic-reward", SteeringOptions(n_extract=40, n_select=12, n_test=n_test))

    pairs50, select50, test50 = split(50)
    pairs, select, test = split(250)
    assert len(test50) == 50 and len(test) == 250 and pairs50.test_origin == ""
    assert [it.question for it in test[:50]] == [it.question for it in test50]  # the official split first
    assert select == select50 and list(pairs) == list(pairs50)  # selection and extraction unchanged
    questions = {p[0]["content"] for p, _ in pairs} | {it.question for it in select}
    assert len({it.question for it in test}) == 250 and not questions & {it.question for it in test}
    assert "200 generate items held out" in pairs.test_origin
    assert_one_line_error(lambda: split(950), "myopic-reward", "n_test=950", "too few")


def test_balance_refuses_a_set_that_cannot_be_balanced():
    items = [data.ABItem("Is it so?", "Yes", "No")] * 4
    assert_one_line_error(lambda: data.balance_answers(items), "cannot balance", "'Yes': 4")
    no_options = [data.ABItem("Pick A or B", "(A)", "(B)")]
    assert_one_line_error(lambda: data.balance_answers(no_options), "item 0", "option (A)")


def test_mean_difference_of_balanced_pairs_cancels_a_letter_direction():
    """Synthetic activations at the answer token: a question part, a behaviour part on the matching
    answer and a letter part on "(A)". The mean difference of the balanced pairs has no letter part;
    that of 27 items matching (A) and 13 matching (B) (the CPU profile's mix before the fix) has."""
    import torch

    from vsteer.extraction import direction

    g = torch.Generator().manual_seed(0)
    behaviour, letter = torch.randn(64, generator=g), torch.randn(64, generator=g)
    letter -= (letter @ behaviour) / (behaviour @ behaviour) * behaviour  # the two parts are orthogonal

    def activation(question: str, answer: str, matching: bool) -> torch.Tensor:
        base = torch.randn(64, generator=torch.Generator().manual_seed(hash(question) % 2**31))
        return base + behaviour * matching + 3.0 * letter * (answer == "(A)")

    def letter_weight(items) -> float:
        pos = torch.stack([activation(it.question, it.matching, True) for it in items])
        neg = torch.stack([activation(it.question, it.not_matching, False) for it in items])
        d = direction(pos, neg, "mean_diff")
        return float(d @ letter / letter.norm())

    items = data.caa_ab("myopic-reward")
    raw = [it for it in items if it.matching == "(A)"][:27] + [it for it in items if it.matching == "(B)"][
        :13
    ]
    assert abs(letter_weight(raw)) > 0.5
    assert abs(letter_weight(data.balance_answers(raw))) < 1e-5


@pytest.mark.parametrize("n_train", [160, 3400])
def test_sst2_sentiment_never_trains_on_a_dev_or_test_sentence(n_train):
    """SST-2's train split shares 2 sentences with its test split (found in review): skipped."""
    from vsteer.data.compare_data import sst2_sentiment

    d = sst2_sentiment(n_train, 64, 450, 0)
    train = {r["text"] for r in d.train}
    assert (
        len(d.train) == n_train
        and not train & {i.text for i in d.test}
        and not train & {i.text for i in d.val}
    )
    with pytest.raises(DataError, match="not in dev or test"):
        sst2_sentiment(10**6, 8, 8, 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_imdb_openings_never_train_or_validate_on_a_held_out_opening(seed):
    """One IMDB review is in both splits (found in review); with seed 1 its pair fell within the
    shipped sizes' 110 training + val pairs. Tokenizer of the embedded model: slow."""
    from transformers import AutoTokenizer

    from vsteer.data.compare_data import imdb_openings
    from vsteer.models import cache_dir, load_model

    load_model("smollm2-135m-instruct")  # materialises the embedded model once per machine
    tok = AutoTokenizer.from_pretrained(cache_dir() / "models" / "smollm2-135m-instruct")
    for n_train, n_val in ((80, 30), (759, 40)):
        d = imdb_openings(tok, n_train, n_val, 198, 24, seed)
        seen = {r["chosen"] for r in d.train} | {r["rejected"] for r in d.train} | {i.text for i in d.val}
        assert not seen & {i.text for i in d.test}


def test_caa_test_items_with_more_than_two_choices_are_left_out_like_the_pool():
    """4 of survival-instinct's 50 CAA test items list options (A)-(E); p(matching) against one other
    answer is undefined there (found in review: they were scored); CAA's other items top the set up."""
    from vsteer.experiments.steering import SteeringOptions, _split_items, _two_choice

    _, select, test = _split_items(
        "caa", "survival-instinct", SteeringOptions(n_extract=40, n_select=12, n_test=50)
    )
    assert len(test) == 50 and all(_two_choice(it) for it in test) and all(_two_choice(it) for it in select)
    assert not {it.question for it in test} & {it.question for it in select}
