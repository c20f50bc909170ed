"""The benchmark's pretraining corpus teaches the trainer's exact COPSD teacher layout: a teacher-layout
document's prompt ids equal the teacher prompt `megatron_copsd.experience.prepare_examples` builds for the
same problem from the RL file, and its response is the target-language solution. (If the trainer's
teacher prompt changes, the base model would be trained on a layout the trainer never shows it.)"""
from __future__ import annotations

from megatron_copsd.synthetic import corpus as C
from megatron_copsd.synthetic.generator import render
from megatron_copsd.synthetic.languages import register_synthetic_languages


def test_teacher_documents_match_trainer_teacher_prompt(tmp_path):
    from megatron_copsd.data.loaders import load_copsd_training
    from megatron_copsd.data.tokenizer import IM_END, train_sentencepiece_tokenizer
    from megatron_copsd.experience import prepare_examples

    register_synthetic_languages()
    spec = C.CorpusSpec(num_english=40, num_parallel=10, num_translation=10, num_target=2, num_rl=6, num_eval=4)
    c = C.build_corpus(spec)
    tok = train_sentencepiece_tokenizer(C.tokenizer_texts(c), tmp_path / "tok", 400, byte_fallback=False)
    # Put the RL problems into the teacher-layout pool: their documents must equal the trainer's prompts.
    c.parallel = {code: list(c.rl) for code in spec.target_langs}
    docs = [d for d in C.pretrain_documents(c) if d["kind"] == "teacher"]
    path = C.write_jsonl(C.rl_rows(c), tmp_path / "rl.jsonl")
    for code in spec.target_langs:
        prepared, dropped = prepare_examples(load_copsd_training(path, code), tok, include_problem_en=True,
                                             include_reference_solution_en=True, max_prompt_tokens=4096,
                                             with_teacher=True)
        assert dropped == 0 and len(prepared) == len(c.rl)
        by_problem = {d["problem"]: d for d in docs if d["lang"] == code}
        for prep, prob in zip(prepared, c.rl):
            doc = by_problem[prep.example.problem]
            ids, start = C.encode_document(tok, doc)
            assert ids[:start] == prep.teacher_ids
            assert tok.decode(ids[start:], skip_special_tokens=False).replace(IM_END, "").strip() == render(prob, code)[1]
            # and the student document layout is the trainer's student prompt
            sdoc = dict(kind="student", lang=code, problem=prep.example.problem, response="x")
            sids, sstart = C.encode_document(tok, sdoc)
            assert sids[:sstart] == prep.student_ids
