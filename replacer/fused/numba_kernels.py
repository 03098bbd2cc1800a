"""Compiled time loops for grouped LSTM and GRU cells: every group, sequence and step in one parallel region.

Layouts (float32, C-contiguous), with H heads, d directions, G = d * H groups (group g is direction
g // H, head g % H), B sequences of N steps, h hidden units and k gate blocks (K = k * h):

- gate inputs `gx (H, B*N, d*K)`: one batched product of the heads' inputs with both directions'
  input weights; `bias (H, d*K)`. The kernel adds the bias and bounds the sum to +-GATE_BOUND itself.
- recurrent weights `w (G, h, K)`, states `(G, B, h)`, step mask `keep (B, N)` (uint8; a zero step
  leaves the state as it was and outputs the carried state), outputs `hs (H, B*N, d*h)`.
- direction 1 runs from the last step to the first, in place: nothing is flipped or copied.

The G x B recurrences are independent, so one `prange` over them is the only parallel region: a few
large chunks of work per call instead of thousands of tiny operations that each wait at a barrier.
Groups may have different live widths `widths (G,)` (pruning ranks units one by one); each costs its
own width, and `order (G,)` lists the groups widest first, which the callers hand out one work item
at a time (numba's chunk size 1), so threads finish together however uneven the widths.
Forward kernels optionally save what the backward needs; backward kernels return the gradients of
the gate inputs and of the recurrent pre-activations (torch turns those into weight gradients with
single large products) and of the initial state. The arithmetic is that of `MultiHeadLSTM.cell` and
`MultiHeadGRU.cell`, with tanh (and sigmoid through it) from the rational approximation below.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from replacer.fused import GATE_BOUND

# error_model="numpy": a division never checks for zero (that check alone stops the loops vectorising)
OPTIONS = {"parallel": True, "fastmath": True, "cache": True, "nogil": True, "error_model": "numpy"}

# tanh(x) ~ x * P(x^2) / Q(x^2) on [-9, 9] (beyond, tanh is 1 to float32 precision): a rational fit made
# for this module by iteratively reweighted least squares on relative error; max abs error 6.3e-7 in
# float32, against libm's ~1e-7. Only multiplies, adds and one division, so the loops over gate units
# vectorise; libm's tanhf/expf do not, and they were most of a step's time.
_P = (1.0, 0.1297602504491806, 0.0029818047769367695, 9.82187339104712e-06, -1.4419807570220655e-08,
      2.2353896511617677e-11)
_Q = (1.0, 0.46309345960617065, 0.024013156071305275, 0.00023652570962440223)


@njit(inline="always", fastmath=True, error_model="numpy")
def _tanh(x):
    x = min(max(x, np.float32(-9.0)), np.float32(9.0))
    s = x * x
    p = np.float32(_P[5])
    p = p * s + np.float32(_P[4])
    p = p * s + np.float32(_P[3])
    p = p * s + np.float32(_P[2])
    p = p * s + np.float32(_P[1])
    p = p * s + np.float32(_P[0])
    q = np.float32(_Q[3])
    q = q * s + np.float32(_Q[2])
    q = q * s + np.float32(_Q[1])
    q = q * s + np.float32(_Q[0])
    return min(max(x * p / q, np.float32(-1.0)), np.float32(1.0))


@njit(inline="always", fastmath=True, error_model="numpy")
def _sigmoid(x):
    return np.float32(0.5) * _tanh(np.float32(0.5) * x) + np.float32(0.5)


@njit(inline="always", fastmath=True, error_model="numpy")
def _gate_inputs(z, gx_row, bias_row, blocks, hidden, width):
    """z = clamp(gx + bias, -GATE_BOUND, GATE_BOUND) for one step of one group, packed: each of the
    `blocks` gate blocks (laid out `hidden` apart in gx and bias) keeps its first `width` units."""
    bound = np.float32(GATE_BOUND)
    for b in range(blocks):
        zb, xb, bb = z[b * width : (b + 1) * width], gx_row[b * hidden : b * hidden + width], bias_row[b * hidden : b * hidden + width]
        for q in range(width):
            zb[q] = min(max(xb[q] + bb[q], -bound), bound)


@njit(inline="always")
def _scatter(dst, src, blocks, hidden, width):
    """The packed `src` (blocks x width) into `dst` laid out in blocks of `hidden`, zeros in the pruned units."""
    for b in range(blocks):
        dst[b * hidden : b * hidden + width] = src[b * width : (b + 1) * width]
        dst[b * hidden + width : (b + 1) * hidden] = 0.0


@njit(inline="always")
def _units(dst, src, width):
    """A state or output row of `hidden` units from a group's `width` live ones (zeros after them)."""
    dst[:width] = src
    dst[width:] = 0.0


@njit(inline="always")
def _packed(w, blocks, hidden, width):
    """A group's recurrent weights `(hidden, blocks*hidden)`, padded to the widest group, as `(width,
    blocks*width)`: a narrower (pruned) group then costs its own width, not the widest one's."""
    if width == hidden:
        return w
    out = np.empty((width, blocks * width), np.float32)
    for j in range(width):
        for b in range(blocks):
            out[j, b * width : (b + 1) * width] = w[j, b * hidden : b * hidden + width]
    return out


@njit(inline="always", fastmath=True, error_model="numpy")
def _bounded_gradient(out, grad, gx_row, bias_row, blocks, hidden, width):
    """d loss / d gate input: the packed `grad` where the clamp let the input through, else zero."""
    bound = np.float32(GATE_BOUND)
    for b in range(blocks):
        ob, gb = out[b * hidden : b * hidden + width], grad[b * width : (b + 1) * width]
        xb, bb = gx_row[b * hidden : b * hidden + width], bias_row[b * hidden : b * hidden + width]
        for q in range(width):
            v = xb[q] + bb[q]
            ob[q] = gb[q] if -bound < v < bound else np.float32(0.0)
        out[b * hidden + width : (b + 1) * hidden] = 0.0


@njit(inline="always", fastmath=True, error_model="numpy")
def _recurrent(z, h, w, hidden, width):
    """z += h @ w, four rows of w per pass: the product is bound by moving z and w through the caches,
    not by its arithmetic, and a pass over four rows loads and stores z a quarter as often."""
    full = hidden - hidden % 4
    for j in range(0, full, 4):
        a0, a1, a2, a3 = h[j], h[j + 1], h[j + 2], h[j + 3]
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        for q in range(width):
            z[q] += (a0 * w0[q] + a1 * w1[q]) + (a2 * w2[q] + a3 * w3[q])
    for j in range(full, hidden):
        hj, wj = h[j], w[j]
        for q in range(width):
            z[q] += hj * wj[q]


@njit(inline="always", fastmath=True, error_model="numpy")
def _recurrent_transposed(out, dz, w, hidden, width):
    """out = dz @ w.T, four rows of w per pass (four dot products share each load of dz)."""
    full = hidden - hidden % 4
    for j in range(0, full, 4):
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for q in range(width):
            d = dz[q]
            s0 += d * w0[q]
            s1 += d * w1[q]
            s2 += d * w2[q]
            s3 += d * w3[q]
        out[j], out[j + 1], out[j + 2], out[j + 3] = s0, s1, s2, s3
    for j in range(full, hidden):
        s, wj = np.float32(0.0), w[j]
        for q in range(width):
            s += dz[q] * wj[q]
        out[j] = s


@njit(inline="always")
def _step(s, n, direction):
    return s if direction == 0 else n - 1 - s


@njit(**OPTIONS)
def lstm_forward(gx, bias, w, widths, order, h0, c0, keep, masked, heads, save, hs, h_n, c_n, acts, cs):
    G, B, H = h0.shape
    N = gx.shape[1] // B
    K = 4 * H
    for gb in prange(G * B):
        g, b = order[gb // B], gb % B
        direction, head = g // heads, g % heads
        gate0, unit0, W = direction * K, direction * H, widths[g]
        wg, bias_row = _packed(w[g], 4, H, W), bias[head, gate0 : gate0 + K]
        h = h0[g, b, :W].copy()
        c = c0[g, b, :W].copy()
        z = np.empty(4 * W, np.float32)
        for s in range(N):
            t = _step(s, N, direction)
            row = b * N + t
            if masked and keep[b, t] == 0:
                _units(hs[head, row, unit0 : unit0 + H], h, W)
                if save:
                    _units(cs[head, row, unit0 : unit0 + H], c, W)
                    acts[head, row, gate0 : gate0 + K] = 0.0
                continue
            _gate_inputs(z, gx[head, row, gate0 : gate0 + K], bias_row, 4, H, W)
            _recurrent(z, h, wg, W, 4 * W)
            for q in range(3 * W):
                z[q] = _sigmoid(z[q])
            candidates = z[3 * W :]  # loops start at 0: one starting elsewhere does not vectorise
            for q in range(W):
                candidates[q] = _tanh(candidates[q])
            for q in range(W):
                c[q] = z[W + q] * c[q] + z[q] * z[3 * W + q]
                h[q] = z[2 * W + q] * _tanh(c[q])
            _units(hs[head, row, unit0 : unit0 + H], h, W)
            if save:
                _scatter(acts[head, row, gate0 : gate0 + K], z, 4, H, W)
                _units(cs[head, row, unit0 : unit0 + H], c, W)
        _units(h_n[g, b], h, W)
        _units(c_n[g, b], c, W)


@njit(**OPTIONS)
def lstm_backward(gx, bias, w, widths, order, c0, keep, masked, heads, acts, cs, dhs, dh_n, dc_n, dz, dgx, dh0, dc0):
    """dz: gradients of the gate pre-activations; dgx: of the gate inputs (zero where they were bounded)."""
    G, B, H = c0.shape
    N = gx.shape[1] // B
    K = 4 * H
    for gb in prange(G * B):
        g, b = order[gb // B], gb % B
        direction, head = g // heads, g % heads
        gate0, unit0, W = direction * K, direction * H, widths[g]
        wg, bias_row = _packed(w[g], 4, H, W), bias[head, gate0 : gate0 + K]
        dh = dh_n[g, b, :W].copy()
        dc = dc_n[g, b, :W].copy()
        dg = np.empty(4 * W, np.float32)
        # views that start at 0, so the loops over units vectorise
        di, df, do, dcand = dg[:W], dg[W : 2 * W], dg[2 * W : 3 * W], dg[3 * W :]
        for s in range(N - 1, -1, -1):
            t = _step(s, N, direction)
            row = b * N + t
            incoming = dhs[head, row, unit0 : unit0 + W]
            for q in range(W):
                dh[q] += incoming[q]
            if masked and keep[b, t] == 0:
                dz[head, row, gate0 : gate0 + K] = 0.0
                dgx[head, row, gate0 : gate0 + K] = 0.0
                continue
            a = acts[head, row, gate0 : gate0 + K]
            ai, af, ao, ac = a[:W], a[H : H + W], a[2 * H : 2 * H + W], a[3 * H : 3 * H + W]
            c_now = cs[head, row, unit0 : unit0 + W]
            c_prev = cs[head, b * N + _step(s - 1, N, direction), unit0 : unit0 + W] if s > 0 else c0[g, b, :W]
            for q in range(W):
                i, f, o, cand = ai[q], af[q], ao[q], ac[q]
                tc = _tanh(c_now[q])
                dct = dc[q] + dh[q] * o * (np.float32(1.0) - tc * tc)
                di[q] = dct * cand * i * (np.float32(1.0) - i)
                df[q] = dct * c_prev[q] * f * (np.float32(1.0) - f)
                do[q] = dh[q] * tc * o * (np.float32(1.0) - o)
                dcand[q] = dct * i * (np.float32(1.0) - cand * cand)
                dc[q] = dct * f
            _scatter(dz[head, row, gate0 : gate0 + K], dg, 4, H, W)
            _bounded_gradient(dgx[head, row, gate0 : gate0 + K], dg, gx[head, row, gate0 : gate0 + K], bias_row, 4, H, W)
            _recurrent_transposed(dh, dg, wg, W, 4 * W)
        _units(dh0[g, b], dh, W)
        _units(dc0[g, b], dc, W)


@njit(**OPTIONS)
def gru_forward(gx, bias, w, widths, order, bias_hh, h0, keep, masked, heads, save, hs, h_n, acts):
    """acts per step and group: [r, z, n, h @ w_n + b_n] (4 blocks of h)."""
    G, B, H = h0.shape
    N = gx.shape[1] // B
    K = 3 * H
    for gb in prange(G * B):
        g, b = order[gb // B], gb % B
        direction, head = g // heads, g % heads
        gate0, unit0, act0, W = direction * K, direction * H, direction * 4 * H, widths[g]
        wg, bias_row = _packed(w[g], 3, H, W), bias[head, gate0 : gate0 + K]
        recurrent_bias = np.empty(3 * W, np.float32)  # bias_hh[g], packed like the gates
        for blk in range(3):
            recurrent_bias[blk * W : (blk + 1) * W] = bias_hh[g, blk * H : blk * H + W]
        h = h0[g, b, :W].copy()
        x = np.empty(3 * W, np.float32)
        zh = np.empty(3 * W, np.float32)
        a = np.empty(4 * W, np.float32)
        for s in range(N):
            t = _step(s, N, direction)
            row = b * N + t
            if masked and keep[b, t] == 0:
                _units(hs[head, row, unit0 : unit0 + H], h, W)
                if save:
                    acts[head, row, act0 : act0 + 4 * H] = 0.0
                continue
            _gate_inputs(x, gx[head, row, gate0 : gate0 + K], bias_row, 3, H, W)
            zh[:] = recurrent_bias
            _recurrent(zh, h, wg, W, 3 * W)
            for q in range(2 * W):
                a[q] = _sigmoid(x[q] + zh[q])
            for q in range(W):
                a[3 * W + q] = zh[2 * W + q]
                a[2 * W + q] = _tanh(x[2 * W + q] + a[q] * zh[2 * W + q])
            for q in range(W):
                h[q] = a[2 * W + q] + a[W + q] * (h[q] - a[2 * W + q])
            _units(hs[head, row, unit0 : unit0 + H], h, W)
            if save:
                _scatter(acts[head, row, act0 : act0 + 4 * H], a, 4, H, W)
        _units(h_n[g, b], h, W)


@njit(**OPTIONS)
def gru_backward(gx, bias, w, widths, order, h0, keep, masked, heads, acts, hs, dhs, dh_n, dgx, dgh, dh0):
    """dgx: gradients of the gate inputs (zero where bounded); dgh: of the recurrent pre-activations."""
    G, B, H = h0.shape
    N = gx.shape[1] // B
    K = 3 * H
    for gb in prange(G * B):
        g, b = order[gb // B], gb % B
        direction, head = g // heads, g % heads
        gate0, unit0, act0, W = direction * K, direction * H, direction * 4 * H, widths[g]
        wg, bias_row = _packed(w[g], 3, H, W), bias[head, gate0 : gate0 + K]
        dh = dh_n[g, b, :W].copy()
        carry = np.empty(W, np.float32)
        dx = np.empty(3 * W, np.float32)
        dg = np.empty(3 * W, np.float32)
        # views that start at 0, so the loops over units vectorise
        dr_h, du_h, dn_h = dg[:W], dg[W : 2 * W], dg[2 * W :]
        dxr, dxu, dxn = dx[:W], dx[W : 2 * W], dx[2 * W :]
        for s in range(N - 1, -1, -1):
            t = _step(s, N, direction)
            row = b * N + t
            incoming = dhs[head, row, unit0 : unit0 + W]
            for q in range(W):
                dh[q] += incoming[q]
            if masked and keep[b, t] == 0:
                dgx[head, row, gate0 : gate0 + K] = 0.0
                dgh[head, row, gate0 : gate0 + K] = 0.0
                continue
            a = acts[head, row, act0 : act0 + 4 * H]
            ar, au, an, ahn = a[:W], a[H : H + W], a[2 * H : 2 * H + W], a[3 * H : 3 * H + W]
            h_prev = hs[head, b * N + _step(s - 1, N, direction), unit0 : unit0 + W] if s > 0 else h0[g, b, :W]
            for q in range(W):
                r, u, n, hn = ar[q], au[q], an[q], ahn[q]
                dn = dh[q] * (np.float32(1.0) - u) * (np.float32(1.0) - n * n)
                dr = dn * hn * r * (np.float32(1.0) - r)
                du = dh[q] * (h_prev[q] - n) * u * (np.float32(1.0) - u)
                dxr[q], dxu[q], dxn[q] = dr, du, dn
                dr_h[q], du_h[q], dn_h[q] = dr, du, dn * r
                carry[q] = dh[q] * u
            _scatter(dgh[head, row, gate0 : gate0 + K], dg, 3, H, W)
            _bounded_gradient(dgx[head, row, gate0 : gate0 + K], dx, gx[head, row, gate0 : gate0 + K], bias_row, 3, H, W)
            _recurrent_transposed(dh, dg, wg, W, 3 * W)
            for q in range(W):
                dh[q] += carry[q]
        _units(dh0[g, b], dh, W)


@njit(**OPTIONS)
def weight_grads(before, dz, widths, order, heads, dw, db):
    """dw[g] = sum over rows of before[g-block]^T dz[g-block]; db[g] = sum over rows of dz[g-block].

    Rows of dw past a group's width stay zero (so do the columns: dz is zero there). One group per
    work item, rows summed in order, four at a time (each pass over dw serves four rows, as
    `_recurrent` does for w): the result does not depend on how many threads run (a BLAS product over
    this long reduction splits it by thread count, and rounds differently).
    """
    G, H, K = dw.shape
    rows = dz.shape[1]
    full = rows - rows % 4
    for item in prange(G):
        g = order[item]
        direction, head = g // heads, g % heads
        gate0, unit0, W = direction * K, direction * H, widths[g]
        out, bias = dw[g], db[g]
        out[:] = 0.0
        bias[:] = 0.0
        for row in range(0, full, 4):
            d0, d1 = dz[head, row, gate0 : gate0 + K], dz[head, row + 1, gate0 : gate0 + K]
            d2, d3 = dz[head, row + 2, gate0 : gate0 + K], dz[head, row + 3, gate0 : gate0 + K]
            h0, h1 = before[head, row, unit0 : unit0 + H], before[head, row + 1, unit0 : unit0 + H]
            h2, h3 = before[head, row + 2, unit0 : unit0 + H], before[head, row + 3, unit0 : unit0 + H]
            for q in range(K):
                bias[q] += (d0[q] + d1[q]) + (d2[q] + d3[q])
            for j in range(W):
                a0, a1, a2, a3 = h0[j], h1[j], h2[j], h3[j]
                o = out[j]
                for q in range(K):
                    o[q] += (a0 * d0[q] + a1 * d1[q]) + (a2 * d2[q] + a3 * d3[q])
        for row in range(full, rows):
            d, h = dz[head, row, gate0 : gate0 + K], before[head, row, unit0 : unit0 + H]
            for q in range(K):
                bias[q] += d[q]
            for j in range(W):
                hj, o = h[j], out[j]
                for q in range(K):
                    o[q] += hj * d[q]


@njit(**OPTIONS)
def row_sums(x, out):
    """out[i] = x[i].sum(0) for x (I, rows, width), rows added in order (independent of thread count)."""
    I, rows, width = x.shape
    for i in prange(I):
        o = out[i]
        o[:] = 0.0
        for row in range(rows):
            r = x[i, row]
            for q in range(width):
                o[q] += r[q]
