"""Attention family: Attention, RotaryEmbedding, LinearAttention, FlexAttention (ai.onnx.preview), SwiGLU,
CausalConvWithState, TensorScatter.

All float paths are pure torch (vmap / jacrev / jacfwd friendly). Half-precision inputs are computed in
float32 internally and cast back to the ONNX output dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import op, onnx_to_torch_dtype

_HALF = (torch.float16, torch.bfloat16)


def _work_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float32 if dt in _HALF else dt


def _ident(t: torch.Tensor) -> torch.Tensor:
    return t


_SEQ_SUM_MAX = 256


def _safe_softmax(x: torch.Tensor, rd=_ident, seq_sum: bool = False) -> torch.Tensor:
    """Softmax over the last axis; a row that is entirely -inf gives zeros (not NaN), gradient-safe.

    ``rd`` rounds intermediate results (to emulate a half-precision runtime step by step)."""
    m = torch.amax(x, dim=-1, keepdim=True).detach()
    m = torch.where(torch.isneginf(m) | torch.isnan(m), torch.zeros_like(m), m)
    e = rd(torch.exp(rd(x - m)))
    n = e.shape[-1]
    if seq_sum and 1 < n <= _SEQ_SUM_MAX:
        # a bfloat16 runtime (numpy + ml_dtypes) accumulates left to right, rounding every addition
        s = e[..., 0:1]
        for k in range(1, n):
            s = rd(s + e[..., k:k + 1])
    else:
        s = rd(e.sum(dim=-1, keepdim=True))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return rd(e / s)


def _to_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hd = x.shape
    return x.reshape(b, s, n_heads, hd // n_heads).transpose(1, 2)


def _neg_inf_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    z = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, z, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


# ---------------------------------------------------------------------------------------------
# Attention (23, 24: nonpad_kv_seqlen, 25: sliding windows)
# ---------------------------------------------------------------------------------------------
@op("Attention", since=23)
def attention(ctx, Q, K, V, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    out_dtype = Q.dtype
    wd = _work_dtype(out_dtype)
    scale = ctx.attr("scale", None)
    is_causal = bool(ctx.attr("is_causal", 0))
    q_heads = ctx.attr("q_num_heads", None)
    kv_heads = ctx.attr("kv_num_heads", None)
    softmax_precision = ctx.attr("softmax_precision", None)
    softcap = float(ctx.attr("softcap", 0.0))
    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    left = int(ctx.attr("left_window_size", -1)) if ctx.opset >= 25 else -1
    right = int(ctx.attr("right_window_size", -1)) if ctx.opset >= 25 else -1

    rank3 = Q.dim() == 3
    if rank3:
        if q_heads is None or kv_heads is None:
            raise ValueError("3-D Attention inputs need q_num_heads and kv_num_heads")
        Q = _to_heads(Q, q_heads)
        K = _to_heads(K, kv_heads)
        V = _to_heads(V, kv_heads)
    if past_key is not None:
        K = torch.cat([past_key.to(K.dtype), K], dim=2)
    if past_value is not None:
        V = torch.cat([past_value.to(V.dtype), V], dim=2)
    present_key, present_value = K, V

    q_len, kv_len = Q.shape[-2], K.shape[-2]
    dev = Q.device
    if scale is None:
        scale = 1.0 / math.sqrt(Q.shape[-1])
    # as the reference (and the function body): sqrt(scale) on both Q and K, rounded to Q's dtype
    sq = torch.tensor(math.sqrt(float(scale)), dtype=out_dtype).to(wd)

    Qw, Kw, Vw = Q.to(wd), K.to(wd), V.to(wd)

    # ---- additive bias ---------------------------------------------------------------------
    bias = torch.zeros((q_len, kv_len), dtype=wd, device=dev)
    if attn_mask is not None:
        pad = kv_len - attn_mask.shape[-1]
        if pad > 0:
            if attn_mask.dtype == torch.bool:
                extra = torch.zeros(attn_mask.shape[:-1] + (pad,), dtype=torch.bool, device=dev)
            else:
                extra = torch.full(attn_mask.shape[:-1] + (pad,), float("-inf"), dtype=attn_mask.dtype,
                                   device=dev)
            attn_mask = torch.cat([attn_mask, extra], dim=-1)
        if attn_mask.dtype == torch.bool:
            mask_bias = _neg_inf_bias(attn_mask, wd)
        else:
            mask_bias = attn_mask.to(wd)
        bias = bias + mask_bias

    i_idx = torch.arange(q_len, device=dev).reshape(q_len, 1)
    j_idx = torch.arange(kv_len, device=dev).reshape(1, kv_len)
    if past_key is None and nonpad_kv_seqlen is not None:
        offset = (nonpad_kv_seqlen.reshape(-1).to(torch.int64) - q_len).reshape(-1, 1, 1, 1)  # (B,1,1,1)
    elif past_key is not None:
        offset = past_key.shape[2]
    else:
        offset = 0
    if is_causal:
        bias = bias + _neg_inf_bias(j_idx <= i_idx + offset, wd)
    if left >= 0 or right >= 0:
        diff = (i_idx + offset) - j_idx
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (diff <= left)
        if right >= 0:
            allowed = allowed & (-diff <= right)
        bias = bias + _neg_inf_bias(allowed, wd)
    if nonpad_kv_seqlen is not None:
        keep = j_idx.reshape(1, 1, 1, kv_len) < nonpad_kv_seqlen.reshape(-1, 1, 1, 1)
        bias = bias + _neg_inf_bias(keep, wd)

    # ---- grouped-query heads -----------------------------------------------------------------
    hq = Qw.shape[1]
    hk = Kw.shape[1]
    if hq != hk and hk > 0 and hq % hk == 0:
        rep = hq // hk
        Kw = torch.repeat_interleave(Kw, rep, dim=1)
        Vw = torch.repeat_interleave(Vw, rep, dim=1)

    if out_dtype in _HALF:
        def rd(t: torch.Tensor) -> torch.Tensor:  # round to the ONNX dtype after each step, as a half runtime
            return t.to(out_dtype).to(wd)
    else:
        def rd(t: torch.Tensor) -> torch.Tensor:
            return t
    bias = rd(bias)
    qk = rd(torch.matmul(rd(Qw * sq), rd(Kw * sq).transpose(-1, -2)))
    if softcap > 0:
        qk = rd(rd(torch.tanh(rd(qk / softcap))) * softcap)
    qk_bias = rd(qk + bias)
    qk_out = qk
    if mode == 2:
        qk_out = qk_bias

    sm_in = qk_bias
    sm_round = rd
    seq_sum = out_dtype == torch.bfloat16
    if softmax_precision is not None:
        sdt = onnx_to_torch_dtype(int(softmax_precision))
        if sdt is not None and sdt.is_floating_point:
            seq_sum = sdt == torch.bfloat16
            if sdt in _HALF:
                # emulate the rounding of a lower softmax precision, compute in float32
                sm_in = sm_in.to(sdt).to(torch.float32)

                def sm_round(t: torch.Tensor, _d=sdt) -> torch.Tensor:
                    return t.to(_d).to(torch.float32)
            else:
                sm_in = sm_in.to(sdt)

                def sm_round(t: torch.Tensor) -> torch.Tensor:
                    return t
    probs = _safe_softmax(sm_in, sm_round, seq_sum)
    row_masked = torch.isneginf(torch.amax(bias, dim=-1, keepdim=True))
    probs = torch.where(row_masked, torch.zeros((), dtype=probs.dtype, device=dev), probs)
    if mode == 3:
        qk_out = probs
    qk_out = qk_out.to(out_dtype)
    if out_dtype in _HALF:
        probs = probs.to(out_dtype)
    probs = probs.to(wd)

    y = rd(torch.matmul(probs, Vw))
    if rank3:
        b = y.shape[0]
        y = y.transpose(1, 2).reshape(b, q_len, -1)
    return y.to(out_dtype), present_key, present_value, qk_out


# ---------------------------------------------------------------------------------------------
# RotaryEmbedding (23)
# ---------------------------------------------------------------------------------------------
@op("RotaryEmbedding", since=23)
def rotary_embedding(ctx, x, cos_cache, sin_cache, position_ids=None):
    interleaved = bool(ctx.attr("interleaved", 0))
    rot_dim = int(ctx.attr("rotary_embedding_dim", 0))
    num_heads = int(ctx.attr("num_heads", 0))
    orig_shape = x.shape
    rank4 = x.dim() == 4
    if rank4:
        xs = x.transpose(1, 2)  # (B, S, H, D)
    else:
        b, s, hid = x.shape
        if num_heads <= 0:
            raise ValueError("RotaryEmbedding with 3-D input needs num_heads")
        xs = x.reshape(b, s, num_heads, hid // num_heads)
    head = xs.shape[-1]
    if rot_dim == 0:
        rot_dim = head
    half = rot_dim // 2
    x_rot = xs[..., :rot_dim]
    x_pass = xs[..., rot_dim:]
    if position_ids is not None:
        cos = cos_cache[position_ids.to(torch.int64)]
        sin = sin_cache[position_ids.to(torch.int64)]
    else:
        cos, sin = cos_cache, sin_cache
    cos = cos[..., :half].unsqueeze(-2).to(x.dtype)
    sin = sin[..., :half].unsqueeze(-2).to(x.dtype)
    if interleaved:
        x1 = x_rot[..., 0::2]
        x2 = x_rot[..., 1::2]
    else:
        x1 = x_rot[..., :half]
        x2 = x_rot[..., half:rot_dim]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rot = torch.stack([real, imag], dim=-1).reshape(x_rot.shape)
    else:
        rot = torch.cat([real, imag], dim=-1)
    out = torch.cat([rot, x_pass], dim=-1)
    if rank4:
        return out.transpose(1, 2)
    return out.reshape(orig_shape)


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------
@op("SwiGLU", since=28)
def swiglu(ctx, a, b):
    alpha = float(ctx.attr("alpha", 1.0))
    wd = _work_dtype(a.dtype)
    aw = a.to(wd)
    sig = torch.sigmoid(alpha * aw).to(a.dtype).to(wd)
    return ((aw * sig).to(a.dtype).to(wd) * b.to(wd)).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# LinearAttention
# ---------------------------------------------------------------------------------------------
@op("LinearAttention", since=27)
def linear_attention(ctx, query, key, value, past_state=None, decay=None, beta=None):
    rule = ctx.attr("update_rule", "gated_delta")
    hq = int(ctx.attr("q_num_heads"))
    hk = int(ctx.attr("kv_num_heads"))
    scale = float(ctx.attr("scale", 0.0) or 0.0)
    gating = rule in ("gated", "gated_delta")
    delta = rule in ("delta", "gated_delta")
    if rule not in ("linear", "gated", "delta", "gated_delta"):
        raise ValueError(f"unsupported update_rule {rule!r}")
    out_dtype = query.dtype
    wd = torch.float64 if out_dtype == torch.float64 else torch.float32
    b, t, _ = query.shape
    dk = query.shape[-1] // hq
    dv = value.shape[-1] // hk
    q4 = _to_heads(query, hq).to(wd)
    k4 = _to_heads(key, hk).to(wd)
    v4 = _to_heads(value, hk).to(wd)
    if gating:
        if decay is None:
            raise ValueError(f"update_rule {rule!r} needs decay")
        if decay.shape[-1] == hk:
            dec4 = decay.reshape(b, t, hk, 1).transpose(1, 2)
        else:
            dec4 = _to_heads(decay, hk)
        dec4 = dec4.to(wd)
    if delta:
        if beta is None:
            raise ValueError(f"update_rule {rule!r} needs beta")
        bl = beta.shape[-1]
        beta4 = beta.reshape(b, t, bl, 1).transpose(1, 2).to(wd)
    if past_state is not None:
        state_dtype = past_state.dtype
        state = past_state.to(wd)
    else:
        state_dtype = out_dtype
        state = torch.zeros((b, hk, dk, dv), dtype=wd, device=query.device)
    sc = 1.0 / math.sqrt(dk) if scale == 0.0 else scale
    group = hq // hk
    outs = []
    for i in range(t):
        q_t = q4[:, :, i, :]
        k_t = k4[:, :, i, :]
        v_t = v4[:, :, i, :]
        if gating:
            state = state * torch.exp(dec4[:, :, i, :])[..., None]
        if delta:
            retrieved = torch.einsum("bhdm,bhd->bhm", state, k_t)
            v_t = beta4[:, :, i, :] * (v_t - retrieved)
        state = state + k_t[..., :, None] * v_t[..., None, :]
        sr = state if group == 1 else torch.repeat_interleave(state, group, dim=1)
        outs.append(sc * torch.einsum("bhd,bhdm->bhm", q_t, sr))
    o = torch.stack(outs, dim=2)  # (B, Hq, T, dv)
    o = o.transpose(1, 2).reshape(b, t, hq * dv)
    return o.to(out_dtype), state.to(state_dtype)


# ---------------------------------------------------------------------------------------------
# CausalConvWithState
# ---------------------------------------------------------------------------------------------
@op("CausalConvWithState", since=27)
def causal_conv_with_state(ctx, x, weight, bias=None, past_state=None):
    act = ctx.attr("activation", "none")
    if act not in ("none", "silu", "swish"):
        raise ValueError(f"unsupported activation {act!r}")
    b, c, _ = x.shape
    k = weight.shape[2]
    if past_state is None:
        pad = torch.zeros((b, c, k - 1), dtype=x.dtype, device=x.device)
    else:
        pad = past_state.to(x.dtype)
    padded = torch.cat([pad, x], dim=2)
    wd = _work_dtype(x.dtype)
    y = F.conv1d(padded.to(wd), weight.to(wd), None if bias is None else bias.to(wd), groups=c)
    y = y.to(x.dtype)
    if act in ("silu", "swish"):
        yw = y.to(wd)
        y = (yw * torch.sigmoid(yw)).to(x.dtype)
    present = padded[:, :, padded.shape[2] - (k - 1):]
    return y, present


# ---------------------------------------------------------------------------------------------
# TensorScatter (24)
# ---------------------------------------------------------------------------------------------
@op("TensorScatter", since=24)
def tensor_scatter(ctx, past_cache, update, write_indices=None):
    mode = ctx.attr("mode", "linear")
    rank = past_cache.dim()
    ax = int(ctx.attr("axis", -2))
    ax = ax + rank if ax < 0 else ax
    bsz = past_cache.shape[0]
    max_len = past_cache.shape[ax]
    seq = update.shape[ax]
    if write_indices is None:
        write_indices = torch.zeros((bsz,), dtype=torch.int64, device=past_cache.device)
    # destination index along ``ax`` for each (batch, s): write_indices[b] + s
    pos = write_indices.reshape(-1, 1).to(torch.int64) + torch.arange(seq, device=past_cache.device).reshape(1, -1)
    if mode == "circular":
        pos = torch.remainder(pos, max_len)
    dest = torch.arange(max_len, device=past_cache.device).reshape(1, -1, 1)
    onehot = pos.unsqueeze(1) == dest  # (B, max_len, seq)
    hit = onehot.any(dim=-1)  # (B, max_len)
    src = torch.argmax(onehot.to(torch.int64), dim=-1)  # (B, max_len): which update row lands there
    shp = [1] * rank
    shp[0] = bsz
    shp[ax] = max_len
    full = list(update.shape)
    full[ax] = max_len
    written = torch.gather(update, ax, src.reshape(shp).expand(full))
    return torch.where(hit.reshape(shp), written.to(past_cache.dtype), past_cache)


# ---------------------------------------------------------------------------------------------
# FlexAttention (ai.onnx.preview 1)
# ---------------------------------------------------------------------------------------------
@op("FlexAttention", since=1, domain="ai.onnx.preview")
def flex_attention(ctx, Q, K, V):
    scale = ctx.attr("scale", None)
    score_mod = ctx.attr("score_mod", None)
    prob_mod = ctx.attr("prob_mod", None)
    sp = ctx.attr("softmax_precision", None)
    hq, e = Q.shape[1], Q.shape[3]
    hk = K.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(e)
    if hq != hk:
        rep = hq // hk
        K = torch.repeat_interleave(K, rep, dim=1)
        V = torch.repeat_interleave(V, rep, dim=1)
    if sp is not None:
        cdt = onnx_to_torch_dtype(int(sp))
    else:
        cdt = torch.float32 if Q.dtype in _HALF or Q.dtype.itemsize < 4 else Q.dtype
    sq = torch.tensor(math.sqrt(float(torch.tensor(scale, dtype=torch.float32))), dtype=torch.float32).to(Q.dtype)
    wd = _work_dtype(Q.dtype)
    scores = torch.matmul((Q * sq).to(wd), (K * sq).to(wd).transpose(-1, -2)).to(Q.dtype).to(cdt)
    if score_mod is not None:
        scores = ctx.run_subgraph(score_mod, [scores])[0].to(cdt)
    probs = torch.softmax(scores, dim=-1)
    if prob_mod is not None:
        probs = ctx.run_subgraph(prob_mod, [probs])[0].to(cdt)
    out = torch.matmul(probs, V.to(cdt))
    return out.to(V.dtype)

