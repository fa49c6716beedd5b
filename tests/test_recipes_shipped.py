"""Every recipe shipped in vsteer/recipes validates (without loading a model)."""

from __future__ import annotations

import pytest

from vsteer.errors import RecipeError
from vsteer.files import resolve_recipe, shipped_recipes
from vsteer.recipes import load_recipe
from vsteer.run import SECTIONS, load_run_spec, section_options

RECIPES = shipped_recipes()
NOT_TRAINING = ("claims.yaml", "verdicts.yaml")
COMPARE = sorted(RECIPES.glob("compare_*.yaml"))
TRAINING = sorted(p for p in RECIPES.glob("*.yaml") if p.name not in NOT_TRAINING and p not in COMPARE)


def test_the_four_comparison_recipes_are_shipped():
    names = {p.name for p in TRAINING}
    assert {"value_only_sft.yaml", "qk_only_sft.yaml", "value_only_dpo.yaml", "qk_only_dpo.yaml"} <= names


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.method in ("sft", "dpo")
    if path.name.startswith("qk_only"):
        assert recipe["adapter.targets"] == "qk" and recipe["adapter.match"] == "v"


@pytest.mark.parametrize("path", COMPARE, ids=lambda p: p.name)
def test_comparison_recipe_validates(path):
    from vsteer.compare import load_compare_recipe

    spec = load_compare_recipe(path)
    assert "v" in spec.arms and len(spec.learning_rates) >= 1


def test_claims_recipe_validates_with_every_section_and_both_profiles():
    for profile in ("cpu", "full"):
        spec = load_run_spec(RECIPES / "claims.yaml", [f"profile={profile}"])
        assert list(spec.sections) == list(SECTIONS)
        for section in spec.sections:
            section_options(spec, section)


@pytest.mark.parametrize(
    "override, message",
    [
        ("colour=red", "unknown key 'colour'"),
        ("profile=huge", "unknown profile 'huge'"),
        ("seed=abc", "key 'seed' must be int"),
        ("options.swaps.n_pears=3", "unknown option swaps.n_pears"),
        ("sections=[adapters,vibes]", "unknown section 'vibes'"),
    ],
)
def test_malformed_run_recipe_is_one_clear_line(override, message):
    with pytest.raises(RecipeError, match=message) as err:
        load_run_spec(RECIPES / "claims.yaml", [override])
    assert "\n" not in str(err.value)


def test_run_recipe_that_is_not_yaml_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_run_spec(bad)


@pytest.mark.parametrize("name", ["claims", "claims.yaml", "recipes/claims.yaml"])
def test_shipped_recipe_is_found_by_name_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe(name) == RECIPES / "claims.yaml"
    assert load_run_spec(name).name == "claims"


def test_a_file_in_the_working_directory_wins_over_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "claims.yaml").write_text("name: mine\n")
    assert load_run_spec("claims.yaml").name == "mine"


def test_unknown_recipe_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="not found.*shipped recipes: claims"):
        load_recipe("value_only_ftt")
