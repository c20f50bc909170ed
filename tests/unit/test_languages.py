"""Language registry: coverage, aliases, runtime registration and YAML overrides."""
import dataclasses

import pytest

from megatron_copsd.data import languages as L


@pytest.fixture(autouse=True)
def restore_registry():
    saved_reg, saved_alias = dict(L._REGISTRY), dict(L._ALIASES)
    yield
    L._REGISTRY.clear(), L._REGISTRY.update(saved_reg)
    L._ALIASES.clear(), L._ALIASES.update(saved_alias)


def test_all_benchmark_languages_present():
    assert len(L.AFRIMGSM_CODES) == 19 and len(L.MGSM_CODES) == 11
    for code in L.AFRIMGSM_CODES + L.MGSM_CODES:
        lang = L.get_language(code)
        assert "\\boxed{}" in lang.instruction
        assert lang.script and lang.name
        if lang.is_english_fallback:
            assert lang.name in lang.instruction and lang.reasoning_prefix == ""
    assert L.get_language("amh").script == "Ethi" and L.get_language("vai").script == "Vaii"
    assert L.get_language("ja").script == "Jpan" and L.get_language("ru").script == "Cyrl"


@pytest.mark.parametrize("a,b", [("sw", "swa"), ("en", "eng"), ("fr", "fra"), ("SW", "swa"), ("deu", "de")])
def test_aliases(a, b):
    assert L.get_language(a) is L.get_language(b)


def test_written_languages_not_flagged_and_fallbacks_flagged():
    for code in ("eng", "fra", "swa", "de", "zh", "ja"):
        assert not L.get_language(code).english_fallback
    assert L.get_language("hau").is_english_fallback
    assert "reasoning_prefix" in L.get_language("yor").english_fallback


def test_unknown_language_message():
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        L.get_language("xx")


def test_register_runtime_language():
    lang = L.Language(code="syn1", name="Synthetic-1", script="Latn", instruction="Do it \\boxed{}",
                      aliases=("s1",))
    L.register_language(lang)
    assert L.get_language("S1") is lang
    with pytest.raises(ValueError, match="already registered"):
        L.register_language(lang)
    with pytest.raises(ValueError, match="already belongs"):
        L.register_language(dataclasses.replace(lang, code="syn2", aliases=("s1",)))
    with pytest.raises(ValueError, match="boxed"):
        L.Language(code="q", name="Q", script="Latn", instruction="no box")


def test_teacher_labels_fill_language_name_and_keep_braces():
    labels = L.get_language("swa").labels()
    assert "Swahili" in labels.instruction and "\\boxed{}" in labels.instruction
    assert "{language}" not in labels.problem


def test_yaml_overrides(tmp_path):
    p = tmp_path / "o.yaml"
    p.write_text(
        "languages:\n"
        "  hau:\n"
        "    instruction: 'Warware matsalar mataki-mataki, ka rubuta amsar a cikin \\boxed{}.'\n"
        "    teacher_labels: {instruction: 'Solve it in {language}: \\boxed{}'}\n"
        "  xyz:\n    name: Xyzish\n    instruction: 'xyz \\boxed{}'\n    aliases: [xy]\n")
    assert L.load_language_overrides(p) == ["hau", "xyz"]
    hau = L.get_language("hau")
    assert hau.instruction.startswith("Warware") and "instruction" not in hau.english_fallback
    assert "reasoning_prefix" in hau.english_fallback
    assert hau.labels().instruction == "Solve it in Hausa: \\boxed{}"
    assert L.get_language("xy").name == "Xyzish"


@pytest.mark.parametrize("body,msg", [
    ("hau:\n  instructions: x\n", "unknown field"),
    ("hau: 3\n", "expected a mapping of fields"),
    ("new1:\n  name: N\n", "needs field"),
    ("hau:\n  instruction: 'no box'\n", "boxed"),
    ("hau:\n  instruction: [1]\n", "must be a string"),
    ("hau: [\n", "invalid YAML"),
])
def test_yaml_override_errors_name_file_and_field(tmp_path, body, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ValueError, match=msg) as ei:
        L.load_language_overrides(p)
    assert "bad.yaml" in str(ei.value)
