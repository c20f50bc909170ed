"""Pure-torch token-chunked fused linear divergence / log-probs: the CPU path and the GPU fallback.

Same algorithm as the Triton kernels, with torch ops on one chunk of tokens at a time (the whole local
vocabulary shard per chunk, so a chunk's [T_c, V_local] fp32 logits are the largest buffers; T_c is chosen
so that one such buffer holds about `CHUNK_ELEMENTS` numbers):

Divergence, forward (gradients are computed here; backward only scales them by grad_output):
  per chunk: a = h_s W^T / tau, b = h_t W_t^T / tau            (2 GEMMs, fp32; 1 when W_t is W)
             local (logsumexp a, logsumexp b)
             all_gather [TP, T_c, 2] -> fixed-order logsumexp  (collective 1)
             local per-token sums that do not cancel (docs/kernels.md), with r = log p - log q formed from the
               logit difference first: forward KL sum p r - q expm1(r), reverse KL sum q (s + expm1(-s)),
               s = -r (every entry's part >= 0 up to rounding; the log-normalizers' rounding cancels to first
               order); JSD with y = log(q/M) = -log1p(beta expm1(r)), x = log(p/M) = r + y: (sum p x,
               sum q y); token_clip, clip_mode="entry" (default), in the same pass: the terms d_v,
               U = {d_v <= c}, (sum_v min(d_v, c), S_U = sum_{v in U} g_v, #clipped, clipped mass), the
               clipped entries located by row maxima (few rows hold any)
               -> all_gather [TP, T_c, 2 (+4)] -> fixed-order sum          (collective 2)
             dZ = coef_t * dLoss_t/da  (coef = loss_weight / tau; entry clip: g [U] - q S_U with
               g_v = q_v dd_v/dq_v; position clip: coef 0 on positions with div > c)
             dH_s[chunk] = dZ W,  dW += dZ^T H_s               (2 GEMMs, fp32 accumulation)
  end:       all_reduce SUM of dH_s over the TP group (the caller gets the full student gradient)
Log-probs, forward: a, local (logsumexp, target logit, E_q[a]) -> all_gather -> combine.
           backward: recompute a per chunk (the output is per token, so dW cannot be rescaled after the
           fact), dZ = (g_lp (onehot - q) - g_ent q (log q + H)) / tau, dH = dZ W, dW += dZ^T H,
           all_reduce SUM of dH.
Every rank must use the same number of chunks, so T_c depends on T and V_local only (pass equal shards).
"""
from __future__ import annotations

import math

import torch

from . import tp
from .types import (FwdBwdOut, GradInForwardDivergence, LogprobResult, divergence_opts, divergence_result,
                    local_valid, position_clip)

CHUNK_ELEMENTS = 1 << 23  # 32 MB per fp32 [T_c, V_local] buffer (4 live): big GEMMs, well under Liger's memory
LOG2E = 1.0 / math.log(2.0)
BLOCK_ELEMENTS = 1 << 18  # elementwise passes run on ~1 MB row blocks so consecutive passes hit the L2 cache


def _chunk_len(num_tokens: int, num_local: int, chunk_size) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(num_tokens, CHUNK_ELEMENTS // max(1, num_local)))


def _exp_stats(x, out):
    """x [n, nv] -> x - rowmax in place, out = exp(x - rowmax); returns (rowmax, rowsum of out).

    exp(x) is taken as exp2(x log2(e)): on CPU about 1.6x faster than exp (0.84 vs 1.35 ns per entry at one
    thread, AVX2). Rounding x log2(e) adds a relative error up to |x| eps, but every sum weights an entry by
    its own exp(x), so the weighted error stays below eps / e (measured 5e-8 over x in [-30, 0])."""
    m = x.amax(1)
    x.sub_(m[:, None])
    return m, torch.mul(x, LOG2E, out=out).exp2_().sum(1)


def _rowdot(x, y, scratch):
    """Row-wise dot product through a preallocated scratch buffer (faster than bmm / vecdot on CPU)."""
    return torch.mul(x, y, out=scratch[:x.shape[0]]).sum(1)


def _clip_entries(d, clip):
    """d [n, nv] per-entry terms, clamped to <= clip in place. Returns (sum_v min(d_v, clip) [n], (rows, cols)
    of the entries above the clip). Few entries exceed it, so only the rows whose largest term does are
    searched (a full-block comparison mask costs more than the whole clip otherwise)."""
    hit_rows = (d.amax(1) > clip).nonzero()[:, 0]
    rows, cols = (d[hit_rows] > clip).nonzero(as_tuple=True)
    hit = (hit_rows[rows], cols)
    return d.clamp_(max=clip).sum(1), hit


def _row_sums(num_rows, rows, values):
    """Per-row sums of scattered values: out[i] = sum of values[k] with rows[k] == i."""
    return values.new_zeros(num_rows).index_add_(0, rows, values)


def _run_stages(stages, num_rows, block_rows, single_rank):
    """stages: [(is_collective, fn(rows: slice))]. One rank: every row block runs all stages back to back, so
    its logit rows stay in cache between passes. Tensor parallel: a collective needs the whole chunk, so
    each local stage runs over every block before the next collective (same number of calls on every rank)."""
    blocks = [slice(r0, min(num_rows, r0 + block_rows)) for r0 in range(0, num_rows, block_rows)]
    if single_rank:
        for r in blocks:
            for _, fn in stages:
                fn(r)
        return
    for collective, fn in stages:
        for r in ([slice(0, num_rows)] if collective else blocks):
            fn(r)


def _divergence_fwd_bwd(hs, ht, w, tw, *, kind, beta, tau, clip, clip_mode, vocab_total, loss_weight, group, nv,
                        need_dh, need_dw, chunk_size) -> FwdBwdOut:
    """Returns FwdBwdOut (per_token [T] fp32, clipped token_loss, clip_stats, dhs [T,H] fp32 | None,
    dw [V_local,H] fp32 | None); the gradients are of sum_t loss_weight_t * token_loss_t.

    Per chunk, with A = a - max_a, X = exp(A), B = b - max_b, Y = exp(B) (so q = X u_a, p = Y u_b with the
    per-row u = exp(max - lse)), every buffer is preallocated and reused in place: 2 exp + 1 expm1 (JSD: + 1
    log1p) per logit, no [T_c, V] temporaries and no [T_c, V] boolean masks (the per-entry clip locates its
    few clipped entries as indices; masked and mixed-dtype ops cost several times a float pass). After
    the sums pass B holds r = log p - log q (forward KL) or x = log p/M (JSD), A holds s = log q - log p
    (reverse KL) or y = log q/M (JSD). Row scales of the logit gradient are applied to the [T_c, H] GEMM
    operands instead of the [T_c, V] buffer."""
    num_t, dev = hs.shape[0], hs.device
    entry = clip is not None and clip_mode == "entry"
    # default teacher head = the student's weights (detached view): one fp32 copy and one GEMM over the
    # stacked hidden states per chunk (~7% faster than two GEMMs on CPU)
    shared = tw.data_ptr() == w.data_ptr() and tw.dtype == w.dtype and tw.stride() == w.stride()
    wv = w[:nv].float()  # [nv, H]; no copy when already fp32
    twv = wv if shared else tw[:nv].float()
    per_token = torch.empty(num_t, dtype=torch.float32, device=dev)
    token_loss = torch.empty(num_t, dtype=torch.float32, device=dev) if entry else None
    clip_stats = torch.empty(num_t, 2, dtype=torch.float32, device=dev) if entry else None
    need_grad = need_dh or need_dw
    dhs = torch.zeros(hs.shape, dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_dw else None
    tc = _chunk_len(num_t, w.shape[0], chunk_size)
    # from the (equal) shard size, not nv: every rank must run the same number of collectives
    rb = max(1, min(tc, BLOCK_ELEMENTS // max(1, w.shape[0])))
    inv_tau = 1.0 / tau
    bufs = torch.empty(4 * tc, nv, dtype=torch.float32, device=dev)  # a chunk's A, B, X, Y (adjacent)
    scratch = torch.empty(rb, nv, dtype=torch.float32, device=dev)
    scratch2 = torch.empty(rb, nv, dtype=torch.float32, device=dev)
    st = torch.zeros(15, tc, dtype=torch.float32, device=dev)  # per-row statistics of the current chunk
    ma, sa, mb, sb, e, lse_a, lse_b, div, d1, klqm, rscale, closs, su, cnt, mss = st
    # local (KL(p||M), KL(q||M)) pieces (JSD) or (divergence, 0), then with the per-entry clip
    # (sum_v min(d_v, c), S_U, #clipped, clipped mass); summed over ranks in one combine
    jl = st.new_zeros(tc, 6 if entry else 2)
    single = tp.tp_size(group) == 1
    for c0 in range(0, num_t, tc):
        c1 = min(num_t, c0 + tc)
        n = c1 - c0
        A, B, X, Y = bufs[:4 * n].view(4, n, -1).unbind(0)
        hs_c, ht_c = hs[c0:c1].float(), ht[c0:c1].float()
        if shared:  # [a; b] = [h_s; h_t] W^T / tau
            torch.mm(torch.cat([hs_c, ht_c]).mul_(inv_tau), wv.T, out=bufs[:2 * n])
        else:
            torch.mm(hs_c * inv_tau, wv.T, out=A)  # student logits / tau
            torch.mm(ht_c * inv_tau, twv.T, out=B)  # teacher logits / tau
        coef = (torch.full((n,), inv_tau, device=dev) if loss_weight is None
                else loss_weight[c0:c1].float() * inv_tau)

        def stats(r):
            if nv == 0:  # this rank's shard is all vocabulary padding
                ma[r], mb[r], sa[r], sb[r] = -math.inf, -math.inf, 0.0, 0.0
                return
            ma[r], sa[r] = _exp_stats(A[r], X[r])  # A = a - max_a, X = exp(A)
            mb[r], sb[r] = _exp_stats(B[r], Y[r])

        def combine(r):
            la, lb = ma[r] + sa[r].log(), mb[r] + sb[r].log()
            if single:
                lse_a[r], lse_b[r] = la, lb
                return
            lse = torch.logsumexp(tp.gather_stats(torch.stack([la, lb], 1), group), 0)  # fixed rank order
            lse_a[r], lse_b[r] = lse.unbind(1)

        def sums(r):
            """Per-token sums with no cancellation against the log-normalizers (their rounding cancels to first
            order between the two parts of each entry); r = (B - A) + (max_b - lse_b) - (max_a - lse_a).
            Per-entry clip: the terms d_v and U = {v: d_v <= c} (_clip_entries), then the local
            (sum_v min(d_v, c), S_U = sum_{v in U} g_v, #clipped, clipped mass) for the same combine. The logit
            gradient is g_j [j in U] - q_j S_U with g_v = q_v dd_v/dq_v (forward KL -p_v, reverse KL
            q_v (log q_v/p_v + 1), JSD (1-beta) q_v log(q_v/M_v)); g [U] is left in the buffer the grad stage
            reads (Y holds p [U] for forward KL; A is set to the value that makes g 0 off U otherwise)."""
            if nv == 0:
                jl[r] = 0.0
                return
            ua, ub = torch.exp(ma[r] - lse_a[r]), torch.exp(mb[r] - lse_b[r])
            shift = ((mb[r] - lse_b[r]) - (ma[r] - lse_a[r]))[:, None]
            rows = B[r].shape[0]
            t = scratch2[:rows]
            if kind == "forward_kl":  # sum_v p r - (p - q) = sum p r - q expm1(r); B becomes r
                rr = B[r].sub_(A[r]).add_(shift)
                qm = ua * _rowdot(X[r], torch.expm1(rr, out=t), scratch)
                if not entry:
                    jl[r, 0] = ub * _rowdot(Y[r], rr, scratch) - qm
                    return
                d = torch.mul(Y[r], ub[:, None], out=t).mul_(rr)  # p r
                jl[r, 0] = d.sum(1) - qm
                jl[r, 2], hit = _clip_entries(d, clip)
                Yr = Y[r]  # p [U] = ub Y [U]
                jl[r, 5] = _row_sums(rows, hit[0], ub[hit[0]] * Yr[hit])
                Yr[hit] = 0.0
                jl[r, 3] = -ub * Yr.sum(1)
            elif kind == "reverse_kl":  # sum_v q s + (p - q) = sum q (s + expm1(-s)), s = -r; A becomes s
                sr = A[r].sub_(B[r]).sub_(shift)
                jl[r, 0] = ua * _rowdot(X[r], torch.neg(sr, out=t).expm1_().add_(sr), scratch)
                if not entry:
                    return
                jl[r, 2], hit = _clip_entries(torch.mul(X[r], ua[:, None], out=t).mul_(sr), clip)  # d = q s
                Ar, Xr = A[r], X[r]
                jl[r, 5] = _row_sums(rows, hit[0], ua[hit[0]] * Xr[hit])
                Ar[hit] = -1.0  # g = q (s + 1) = 0 off U
                jl[r, 3] = ua * torch.add(Ar, 1.0, out=t).mul_(Xr).sum(1)
            else:  # y = log q/M = -log1p(beta expm1(r)) into A, x = log p/M = r + y into B
                rr = B[r].sub_(A[r]).add_(shift)
                torch.neg(torch.expm1(rr, out=t).mul_(beta).log1p_(), out=A[r])
                rr.add_(A[r])
                jl[r, 0] = ub * _rowdot(Y[r], rr, scratch)  # KL(p||M) part
                jl[r, 1] = ua * _rowdot(X[r], A[r], scratch)  # KL(q||M) part
                if not entry:
                    return
                d = torch.mul(Y[r], beta * ub[:, None], out=t).mul_(rr)  # beta p x + (1 - beta) q y
                d.addcmul_(torch.mul(X[r], (1.0 - beta) * ua[:, None], out=scratch[:rows]), A[r])
                jl[r, 2], hit = _clip_entries(d, clip)
                Ar, Xr, Yr = A[r], X[r], Y[r]
                jl[r, 5] = _row_sums(rows, hit[0], beta * ub[hit[0]] * Yr[hit] + (1.0 - beta) * ua[hit[0]] * Xr[hit])
                Ar[hit] = 0.0  # g = (1 - beta) q y = 0 off U
                jl[r, 3] = (1.0 - beta) * ua * _rowdot(Xr, Ar, scratch)
            if entry:
                jl[r, 4] = hit[0].bincount(minlength=rows).float()

        def sums_combine(r):
            s = jl[r] if single else tp.gather_stats(jl[r], group).sum(0)  # fixed rank order
            if kind == "jsd":
                div[r] = beta * s[:, 0] + (1 - beta) * s[:, 1]  # JSD = beta KL(p||M) + (1-beta) KL(q||M)
                klqm[r] = s[:, 1]
            else:
                div[r] = s[:, 0]
            if entry:
                closs[r], su[r], cnt[r], mss[r] = s[:, 2:].unbind(1)

        def grad(r):
            cf = coef[r] if clip is None or entry else coef[r] * (div[r] <= clip)  # position clip: no gradient
            if nv == 0:
                return
            ua = torch.exp(ma[r] - lse_a[r])
            if kind == "forward_kl":  # dz = coef (q - p); entry clip: coef (q S_U - p [U]) with Y = exp(B) [U]
                ub = torch.exp(mb[r] - lse_b[r])
                X[r].mul_((cf * ua * (-su[r] if entry else 1.0))[:, None]).addcmul_(Y[r], (-cf * ub)[:, None])
                return
            rscale[r] = cf * ua  # dz = rscale * X * A (A written here)
            if kind == "reverse_kl":  # coef q (s - KL(q||p)); entry clip: coef q ((s + 1) [U] - S_U)
                c = (1.0 - su[r]) if entry else -div[r]
                A[r].add_(c[:, None]).mul_(X[r])
            elif entry:  # coef q ((1 - beta) y [U] - S_U)
                A[r].mul_(1.0 - beta).sub_(su[r][:, None]).mul_(X[r])
            else:  # (1 - beta) coef q (log q - log M - KL(q||M)); A = y = log q/M
                rscale[r] *= 1.0 - beta
                A[r].sub_(klqm[r][:, None]).mul_(X[r])

        stages = [(False, stats), (True, combine), (False, sums), (True, sums_combine)]
        if need_grad:
            stages.append((False, grad))
        _run_stages(stages, n, rb, single)
        per_token[c0:c1] = div[:n]
        if entry:
            token_loss[c0:c1] = closs[:n]
            clip_stats[c0:c1, 0], clip_stats[c0:c1, 1] = cnt[:n], mss[:n]
        if not need_grad:
            continue
        if kind == "forward_kl":
            dz, s = X, None
        else:
            dz, s = A, rscale[:n, None]
        if dhs is not None:
            torch.mm(dz, wv, out=dhs[c0:c1])
            if s is not None:
                dhs[c0:c1].mul_(s)
        if dw is not None:
            dw[:nv].addmm_(dz.T, hs_c if s is None else hs_c * s)
    if dhs is not None:
        tp.all_reduce_sum(dhs, group)
    if clip is not None and not entry:
        token_loss, clip_stats, _ = position_clip(per_token, clip, vocab_total)
    return FwdBwdOut(per_token, token_loss, clip_stats, dhs, dw)


def fused_linear_divergence(student_hidden, teacher_hidden, weight, *, teacher_weight=None, kind, beta,
                            temperature, token_clip, loss_weight, tp_group, vocab_start, valid_vocab,
                            chunk_size=None, clip_mode="entry", fwd_bwd=None):
    """Chunked implementation; `kind` is the resolved divergence (see types.resolve_divergence)."""
    tw = weight.detach() if teacher_weight is None else teacher_weight.detach()
    opts = divergence_opts(weight, kind=kind, beta=beta, temperature=temperature, token_clip=token_clip,
                           tp_group=tp_group, vocab_start=vocab_start, valid_vocab=valid_vocab, chunk_size=chunk_size,
                           clip_mode=clip_mode)
    lw = None if loss_weight is None else loss_weight.detach()
    loss, per_token, stats = GradInForwardDivergence.apply(student_hidden, teacher_hidden.detach(), weight, tw, lw,
                                                           fwd_bwd or _divergence_fwd_bwd, opts)
    return divergence_result(loss, per_token, stats, opts["clip"])


def _logprob_chunks(h, w, targets, *, tau, vocab_start, nv, group, chunk_size, fn):
    tc = _chunk_len(h.shape[0], w.shape[0], chunk_size)
    wv = w[:nv].float()
    for c0 in range(0, h.shape[0], tc):
        c1 = min(h.shape[0], c0 + tc)
        h_c = h[c0:c1].float()
        local = targets[c0:c1].long() - vocab_start
        owned = (local >= 0) & (local < nv)
        fn(c0, c1, h_c, (h_c * (1.0 / tau)) @ wv.T, local.clamp(0, max(nv - 1, 0)), owned, wv)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, opts):
        num_t = h.shape[0]
        lse = torch.empty(num_t, dtype=torch.float32, device=h.device)
        lp, ent = torch.empty_like(lse), torch.empty_like(lse)

        def stats(c0, c1, h_c, a, local, owned, wv):
            la = torch.logsumexp(a, 1)
            ay = torch.where(owned, a.gather(1, local[:, None])[:, 0] if a.shape[1] else la, 0.0)
            ea = torch.sub(a, la[:, None]).exp_().mul_(a).sum(1)
            lse[c0:c1], lp[c0:c1], ent[c0:c1] = tp.combine_logprob(
                tp.gather_stats(torch.stack([la, ay, ea], 1), opts["group"]))

        _logprob_chunks(h, w, targets, fn=stats, **opts)
        ctx.save_for_backward(h, w, targets, lse, ent)
        ctx.opts = opts
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, targets, lse, ent = ctx.saved_tensors
        opts = ctx.opts
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
        inv_tau = 1.0 / opts["tau"]

        def grads(c0, c1, h_c, a, local, owned, wv):
            logq = a.sub_(lse[c0:c1, None])
            q = logq.exp()
            dz = torch.zeros_like(q)
            if g_lp is not None:
                glp = g_lp[c0:c1].float()
                dz.sub_(q * glp[:, None])
                rows = torch.arange(c1 - c0, device=h.device)[owned]
                dz[rows, local[owned]] += glp[owned]
            if g_ent is not None:
                dz.sub_(logq.add_(ent[c0:c1, None]).mul_(q).mul_(g_ent[c0:c1].float()[:, None]))
            dz.mul_(inv_tau)
            dh[c0:c1] = dz @ wv
            if dw is not None:
                dw[:wv.shape[0]].addmm_(dz.T, h_c)

        _logprob_chunks(h, w, targets, fn=grads, **opts)
        tp.all_reduce_sum(dh, opts["group"])  # every rank holds a partial sum over its vocab shard
        return (dh.to(h.dtype) if need_dh else None), (None if dw is None else dw.to(w.dtype)), None, None


def fused_linear_logprobs(hidden, weight, target_ids, *, temperature, tp_group, vocab_start, valid_vocab,
                          return_entropy, chunk_size=None) -> LogprobResult:
    opts = dict(tau=float(temperature), vocab_start=int(vocab_start), group=tp_group, chunk_size=chunk_size,
                nv=local_valid(weight.shape[0], vocab_start, valid_vocab))
    lp, ent = _ChunkedLogprobs.apply(hidden, weight, target_ids, opts)
    return LogprobResult(lp, ent if return_entropy else None)
