"""The language registry: codes, aliases, scripts and every per-language string the prompts use.

    from megatron_copsd.data.languages import get_language, load_language_overrides
    lang = get_language("sw")            # the same object as get_language("swa")
    load_language_overrides("my_strings.yaml")

Covered: AfriMGSM's 17 languages plus eng and fra (`AFRIMGSM_CODES`) and the MGSM/PolyMath set
(`MGSM_CODES`). Canonical codes are the ones the benchmarks use (3 letters for AfriMGSM, 2 for MGSM);
`sw`/`swa`, `en`/`eng`, `fr`/`fra` (and the ISO 639-3 codes of the MGSM set) are aliases.

The wording is ours. Where we could not write a language well we use English and list the field in
`Language.english_fallback`; for those languages the English instruction asks for reasoning in the
language, and there is no reasoning prefix (an English prefix would steer the model to English). The
teacher labels are English for every language by design: the teacher reads the privileged English
material anyway, and only the problem is in the target language.

Overrides: a YAML mapping `code -> {field: value}` (optionally under a top-level `languages:` key);
fields are `name`, `native_name`, `script`, `instruction`, `reasoning_prefix`, `aliases` and
`teacher_labels` (a mapping with the fields of `TeacherLabels`). An unknown code with at least `name`
and `instruction` registers a new language. An overridden string is no longer flagged as a fallback.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class TeacherLabels:
    """Strings of the COPSD teacher prompt; `{language}` is replaced by the language's English name."""

    problem: str = "Problem (in {language}):"
    problem_en: str = "The same problem, translated into English:"
    reference_begin: str = "----- BEGIN REFERENCE SOLUTION (English) -----"
    reference_end: str = "----- END REFERENCE SOLUTION -----"
    instruction: str = ("Use the material above only as guidance. Solve the original {language} problem "
                        "yourself, reasoning step by step in {language}, and write the final answer inside "
                        "\\boxed{}.")

    def format(self, language: str) -> "TeacherLabels":
        # plain replacement, not str.format, so user strings may contain braces like \boxed{}
        return TeacherLabels(**{f.name: getattr(self, f.name).replace("{language}", language)
                                for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class Language:
    """One language. `instruction` is shown to the student after the problem; `reasoning_prefix` (may be
    empty) can open the assistant turn so the model starts reasoning in the language."""

    code: str
    name: str
    script: str  # ISO 15924
    instruction: str
    reasoning_prefix: str = ""
    native_name: str = ""
    aliases: tuple[str, ...] = ()
    teacher_labels: TeacherLabels = field(default_factory=TeacherLabels)
    english_fallback: frozenset[str] = frozenset()  # names of fields that hold English stand-ins

    def __post_init__(self):
        for f in ("code", "name", "script", "instruction"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f).strip():
                raise ValueError(f"Language.{f} must be a non-empty string, got {getattr(self, f)!r}")
        if "\\boxed" not in self.instruction:
            raise ValueError(f"Language {self.code!r}: instruction must ask for the answer in \\boxed{{}}")

    @property
    def is_english_fallback(self) -> bool:
        """True when the student instruction is an English stand-in."""
        return "instruction" in self.english_fallback

    def labels(self) -> TeacherLabels:
        """Teacher labels with the language name filled in."""
        return self.teacher_labels.format(self.name)


AFRIMGSM_CODES = ("amh", "ewe", "hau", "ibo", "kin", "lin", "lug", "orm", "sna", "sot", "swa", "twi",
                  "vai", "wol", "xho", "yor", "zul", "eng", "fra")
MGSM_CODES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")

_REGISTRY: dict[str, Language] = {}
_ALIASES: dict[str, str] = {}


def _fallback_instruction(name: str) -> str:
    return (f"Solve the problem step by step, reasoning in {name}, and write the final answer "
            "inside \\boxed{}.")


# code, English name, native name, script, instruction, reasoning prefix, aliases
_WRITTEN = [
    ("eng", "English", "English", "Latn",
     "Solve the problem step by step, and write the final answer inside \\boxed{}.",
     "Let me work through this step by step.", ("en",)),
    ("fra", "French", "français", "Latn",
     "Résous le problème étape par étape, puis écris la réponse finale dans \\boxed{}.",
     "Réfléchissons étape par étape.", ("fr",)),
    ("swa", "Swahili", "Kiswahili", "Latn",
     "Tatua tatizo hili hatua kwa hatua, kisha andika jibu la mwisho ndani ya \\boxed{}.",
     "Hebu nifikirie hatua kwa hatua.", ("sw",)),
    ("de", "German", "Deutsch", "Latn",
     "Löse die Aufgabe Schritt für Schritt und schreibe die endgültige Antwort in \\boxed{}.",
     "Ich gehe die Aufgabe Schritt für Schritt durch.", ("deu", "ger")),
    ("es", "Spanish", "español", "Latn",
     "Resuelve el problema paso a paso y escribe la respuesta final dentro de \\boxed{}.",
     "Vamos a pensarlo paso a paso.", ("spa",)),
    ("ja", "Japanese", "日本語", "Jpan",
     "この問題を一歩ずつ解き、最終的な答えを \\boxed{} の中に書いてください。",
     "一歩ずつ考えてみます。", ("jpn",)),
    ("zh", "Chinese", "中文", "Hans",
     "请一步一步地解答这道题，并把最终答案写在 \\boxed{} 中。",
     "让我一步一步地思考。", ("zho", "chi")),
    ("ru", "Russian", "русский", "Cyrl",
     "Решите задачу шаг за шагом и запишите окончательный ответ внутри \\boxed{}.",
     "Давайте рассуждать шаг за шагом.", ("rus",)),
    ("bn", "Bengali", "বাংলা", "Beng",
     "সমস্যাটি ধাপে ধাপে সমাধান করো এবং চূড়ান্ত উত্তরটি \\boxed{} এর ভিতরে লেখো।",
     "আমি ধাপে ধাপে চিন্তা করি।", ("ben",)),
    ("te", "Telugu", "తెలుగు", "Telu",
     "ఈ సమస్యను దశలవారీగా పరిష్కరించి, తుది సమాధానాన్ని \\boxed{} లో రాయండి.",
     "దశలవారీగా ఆలోచిద్దాం.", ("tel",)),
    ("th", "Thai", "ไทย", "Thai",
     "แก้โจทย์นี้ทีละขั้นตอน แล้วเขียนคำตอบสุดท้ายไว้ใน \\boxed{}",
     "ลองคิดทีละขั้นตอนกัน", ("tha",)),
]

# AfriMGSM languages whose strings we cannot write reliably: English stand-ins, flagged.
_FALLBACK = [
    ("amh", "Amharic", "አማርኛ", "Ethi"), ("ewe", "Ewe", "Eʋegbe", "Latn"), ("hau", "Hausa", "Hausa", "Latn"),
    ("ibo", "Igbo", "Igbo", "Latn"), ("kin", "Kinyarwanda", "Ikinyarwanda", "Latn"),
    ("lin", "Lingala", "Lingála", "Latn"), ("lug", "Luganda", "Oluganda", "Latn"),
    ("orm", "Oromo", "Afaan Oromoo", "Latn"), ("sna", "Shona", "chiShona", "Latn"),
    ("sot", "Sesotho", "Sesotho", "Latn"), ("twi", "Twi", "Twi", "Latn"), ("vai", "Vai", "ꕙꔤ", "Vaii"),
    ("wol", "Wolof", "Wolof", "Latn"), ("xho", "Xhosa", "isiXhosa", "Latn"), ("yor", "Yoruba", "Yorùbá", "Latn"),
    ("zul", "Zulu", "isiZulu", "Latn"),
]


def _key(code: str) -> str:
    return code.strip().lower().replace("_", "-")


def register_language(lang: Language, *, replace: bool = False) -> Language:
    """Adds `lang` (and its aliases) to the registry; `replace=True` to overwrite an existing code."""
    code = _key(lang.code)
    taken = {_key(a) for a in (lang.code, *lang.aliases)}
    for k in taken:
        owner = _ALIASES.get(k)
        if owner is not None and owner != code:
            raise ValueError(f"language code/alias {k!r} already belongs to {owner!r}")
    if code in _REGISTRY and not replace:
        raise ValueError(f"language {code!r} is already registered (pass replace=True to overwrite)")
    old = _REGISTRY.get(code)
    if old is not None:
        for a in old.aliases:
            _ALIASES.pop(_key(a), None)
    _REGISTRY[code] = lang
    for k in taken:
        _ALIASES[k] = code
    return lang


def get_language(code_or_alias: str) -> Language:
    """The registered language for a code or alias (case-insensitive)."""
    code = _ALIASES.get(_key(str(code_or_alias)))
    if code is None:
        raise ValueError(f"unknown language {code_or_alias!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[code]


def canonical_code(code_or_alias: str) -> str:
    return get_language(code_or_alias).code


def list_languages() -> list[Language]:
    return [_REGISTRY[c] for c in sorted(_REGISTRY)]


_OVERRIDE_FIELDS = {"name", "native_name", "script", "instruction", "reasoning_prefix", "aliases",
                    "teacher_labels", "english_fallback"}


def apply_language_overrides(data: Mapping[str, Any], *, source: str = "<overrides>") -> list[str]:
    """Applies a `code -> {field: value}` mapping (see the module docstring). Returns the codes touched."""
    if isinstance(data, Mapping) and set(data) == {"languages"}:
        data = data["languages"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping of language code -> fields, got {type(data).__name__}")
    touched = []
    for code, fields in data.items():
        where = f"{source}: language {code!r}"
        if not isinstance(fields, Mapping):
            raise ValueError(f"{where}: expected a mapping of fields, got {type(fields).__name__}")
        unknown = set(fields) - _OVERRIDE_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed {sorted(_OVERRIDE_FIELDS)}")
        for k, v in fields.items():
            if k in ("aliases", "teacher_labels", "english_fallback"):
                continue
            if not isinstance(v, str):
                raise ValueError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
        try:
            base = get_language(str(code))
        except ValueError:
            base = None
        labels = base.teacher_labels if base else TeacherLabels()
        if "teacher_labels" in fields:
            tl = fields["teacher_labels"]
            names = {f.name for f in dataclasses.fields(TeacherLabels)}
            if not isinstance(tl, Mapping) or set(tl) - names:
                raise ValueError(f"{where}: teacher_labels must be a mapping with fields from {sorted(names)}")
            labels = dataclasses.replace(labels, **{k: str(v) for k, v in tl.items()})
        aliases = fields.get("aliases", base.aliases if base else ())
        if isinstance(aliases, str) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{where}: field 'aliases' must be a list of strings")
        changed = {k for k in fields if k in ("instruction", "reasoning_prefix")}
        flags = (base.english_fallback if base else frozenset()) - changed
        if "english_fallback" in fields:
            flags = frozenset(fields["english_fallback"])
        if base is None:
            missing = {"name", "instruction"} - set(fields)
            if missing:
                raise ValueError(f"{where}: a new language needs field(s) {sorted(missing)}")
        kw = {k: v for k, v in fields.items() if k in ("name", "native_name", "script", "instruction",
                                                        "reasoning_prefix")}
        try:
            if base is None:
                lang = Language(code=str(code), script=kw.pop("script", "Latn"), aliases=tuple(aliases),
                                teacher_labels=labels, english_fallback=flags, **kw)
            else:
                lang = dataclasses.replace(base, aliases=tuple(aliases), teacher_labels=labels,
                                           english_fallback=flags, **kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        register_language(lang, replace=True)
        touched.append(lang.code)
    return touched


def load_language_overrides(path: str | Path) -> list[str]:
    """Reads a YAML file of overrides (see the module docstring) and applies it to the registry."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return []
    return apply_language_overrides(data, source=str(path))


def _register_builtins() -> None:
    for code, name, native, script, instr, prefix, aliases in _WRITTEN:
        register_language(Language(code=code, name=name, native_name=native, script=script,
                                   instruction=instr, reasoning_prefix=prefix, aliases=aliases))
    for code, name, native, script in _FALLBACK:
        register_language(Language(code=code, name=name, native_name=native, script=script,
                                   instruction=_fallback_instruction(name), reasoning_prefix="",
                                   english_fallback=frozenset({"instruction", "reasoning_prefix"})))


_register_builtins()
