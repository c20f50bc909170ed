"""real-bench's data and prompt plumbing (no model): the problems are one-step and disjoint between train and
eval, every target-language row carries the English teacher material, and the short answer instruction is
applied to student and teacher prompts only inside `real_languages()` (the registry is restored after)."""
from megatron_copsd.data.languages import get_language
from megatron_copsd.data.prompts import copsd_teacher_user_content
from megatron_copsd.realbench import (GEN, INSTRUCTION, LANGS, TEACHER_INSTRUCTION, eval_examples, real_languages,
                                      train_rows)
from megatron_copsd.synthetic.generator import generate_problems


def test_rows_one_step_and_disjoint():
    train, evals = generate_problems(11, 64, "train", GEN), generate_problems(12, 32, "eval", GEN)
    assert all(len(p.steps) == 1 for p in train + evals)
    assert not {p.signature() for p in train} & {p.signature() for p in evals}
    rows = train_rows(train)
    assert all(r["problem_fr"] != r["problem"] and "\\boxed{" in r["solution"] for r in rows)
    ex = eval_examples(evals)
    assert sorted({e["lang"] for e in ex}) == ["de", "eng", "es", "fra"] and len(ex) == 4 * 32


def test_instruction_applied_and_restored():
    originals = {c: get_language(c) for c in ("eng", *LANGS)}
    with real_languages():
        for c in ("eng", *LANGS):
            assert get_language(c).instruction == INSTRUCTION
        teacher = copsd_teacher_user_content("fr", "Ana a 3 œufs.", "Ana has 3 eggs.", "3. \\boxed{3}")
        assert teacher.endswith(TEACHER_INSTRUCTION) and "Ana has 3 eggs." in teacher
    for c, lang in originals.items():
        assert get_language(c) is lang and lang.instruction != INSTRUCTION
