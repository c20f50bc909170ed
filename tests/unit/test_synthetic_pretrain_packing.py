"""Packed pretraining rows (megatron_copsd.synthetic.pretrain._collate) compute what each document
computes alone: block-diagonal causal attention, positions restarting per document, loss mask inside
documents only. Runs a real single-rank Megatron GPT model (~5 s)."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from megatron_copsd.synthetic.pretrain import TinyModelSpec, _collate, _pack_rows, qwen3_config


def test_pack_rows_first_fit_and_errors():
    rows = _pack_rows([5, 3, 4, 2, 6], row_len=8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 6][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3  # 20 tokens need at least 3 rows of 8
    with pytest.raises(ValueError, match="row length"):
        _pack_rows([9], row_len=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_packed_rows_match_separate_documents(monkeypatch):
    from megatron_copsd.megatron import dist
    from megatron_copsd.megatron.model_provider import build_gpt_model

    torch.set_num_threads(1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(2, 50, (n,), generator=g).tolist(), 0) for n in (7, 4, 9, 3)]
    cfg = qwen3_config(TinyModelSpec(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2, max_position_embeddings=16), 50, eos_token_id=1, pad_token_id=0)
    created = not torch.distributed.is_initialized()
    dist.init_distributed(1, 1, seed=0)
    try:
        torch.manual_seed(0)
        model = build_gpt_model(cfg, max_sequence_length=16).eval()
        model.return_hidden_states = True
        inp, tgt, mask, pos, blocked = _collate(docs, pad_id=0, row_len=12)
        assert inp.shape[0] < len(docs)  # really packed (23 tokens in rows of 12)
        assert int(mask.sum()) == sum(len(ids) - 1 for ids, _ in docs)
        with torch.no_grad():
            packed = model(inp, pos, blocked).transpose(0, 1)[mask]  # [T, h] in row order
            alone = []
            for row in _pack_rows([len(ids) for ids, _ in docs], 12):
                for i in row:
                    ids = torch.tensor([docs[i][0]])
                    h = model(ids, torch.arange(ids.shape[1])[None], None).transpose(0, 1)[0]
                    alone.append(h[:-1])
        torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
        # the targets of every loss position are the document's own next tokens
        expected = [t for row in _pack_rows([len(ids) for ids, _ in docs], 12) for i in row for t in docs[i][0][1:]]
        assert tgt[mask].tolist() == expected
    finally:
        if created:
            dist.destroy_distributed()
