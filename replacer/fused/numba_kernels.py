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
def _gate_inputs(z, gx_row, bias_row, width):
    """z = clamp(gx + bias, -GATE_BOUND, GATE_BOUND) for one step of one group."""
    bound = np.float32(GATE_BOUND)
    for q in range(width):
        z[q] = min(max(gx_row[q] + bias_row[q], -bound), bound)


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
def lstm_forward(gx, bias, w, h0, c0, keep, masked, heads, save, hs, h_n, c_n, acts, cs):
    G, B, H = h0.shape
    N = gx.shape[1] // B
    K = 4 * H
    for gb in prange(G * B):
        g, b = gb // B, gb % B
        direction, head = g // heads, g % heads
        gate0, unit0 = direction * K, direction * H
        h = h0[g, b].copy()
        c = c0[g, b].copy()
        z = np.empty(K, np.float32)
        wg = w[g]
        for s in range(N):
            t = _step(s, N, direction)
            row = b * N + t
            if masked and keep[b, t] == 0:
                hs[head, row, unit0 : unit0 + H] = h
                if save:
                    cs[head, row, unit0 : unit0 + H] = c
                    acts[head, row, gate0 : gate0 + K] = 0.0
                continue
            _gate_inputs(z, gx[head, row, gate0 : gate0 + K], bias[head, gate0 : gate0 + K], K)
            _recurrent(z, h, wg, H, K)
            for q in range(3 * H):
                z[q] = _sigmoid(z[q])
            candidates = z[3 * H :]  # loops start at 0: one starting elsewhere does not vectorise
            for q in range(H):
                candidates[q] = _tanh(candidates[q])
            for q in range(H):
                c[q] = z[H + q] * c[q] + z[q] * z[3 * H + q]
                h[q] = z[2 * H + q] * _tanh(c[q])
            hs[head, row, unit0 : unit0 + H] = h
            if save:
                acts[head, row, gate0 : gate0 + K] = z
                cs[head, row, unit0 : unit0 + H] = c
        h_n[g, b] = h
        c_n[g, b] = c


@njit(**OPTIONS)
def lstm_backward(gx, bias, w, c0, keep, masked, heads, acts, cs, dhs, dh_n, dc_n, dz, dgx, dh0, dc0):
    """dz: gradients of the gate pre-activations; dgx: of the gate inputs (zero where they were bounded)."""
    G, B, H = c0.shape
    N = gx.shape[1] // B
    K = 4 * H
    bound = np.float32(GATE_BOUND)
    for gb in prange(G * B):
        g, b = gb // B, gb % B
        direction, head = g // heads, g % heads
        gate0, unit0 = direction * K, direction * H
        dh = dh_n[g, b].copy()
        dc = dc_n[g, b].copy()
        wg = w[g]
        for s in range(N - 1, -1, -1):
            t = _step(s, N, direction)
            row = b * N + t
            for q in range(H):
                dh[q] += dhs[head, row, unit0 + q]
            if masked and keep[b, t] == 0:
                dz[head, row, gate0 : gate0 + K] = 0.0
                dgx[head, row, gate0 : gate0 + K] = 0.0
                continue
            # views that start at 0, so the loop over units vectorises
            ai, af = acts[head, row, gate0 : gate0 + H], acts[head, row, gate0 + H : gate0 + 2 * H]
            ao, ac = acts[head, row, gate0 + 2 * H : gate0 + 3 * H], acts[head, row, gate0 + 3 * H : gate0 + K]
            di, df = dz[head, row, gate0 : gate0 + H], dz[head, row, gate0 + H : gate0 + 2 * H]
            do, dcand = dz[head, row, gate0 + 2 * H : gate0 + 3 * H], dz[head, row, gate0 + 3 * H : gate0 + K]
            c_now = cs[head, row, unit0 : unit0 + H]
            c_prev = cs[head, b * N + _step(s - 1, N, direction), unit0 : unit0 + H] if s > 0 else c0[g, b]
            for q in range(H):
                i, f, o, cand = ai[q], af[q], ao[q], ac[q]
                tc = _tanh(c_now[q])
                dct = dc[q] + dh[q] * o * (np.float32(1.0) - tc * tc)
                di[q] = dct * cand * i * (np.float32(1.0) - i)
                df[q] = dct * c_prev[q] * f * (np.float32(1.0) - f)
                do[q] = dh[q] * tc * o * (np.float32(1.0) - o)
                dcand[q] = dct * i * (np.float32(1.0) - cand * cand)
                dc[q] = dct * f
            x, bias_row = gx[head, row, gate0 : gate0 + K], bias[head, gate0 : gate0 + K]
            out, dg = dgx[head, row, gate0 : gate0 + K], dz[head, row, gate0 : gate0 + K]
            for q in range(K):
                v = x[q] + bias_row[q]
                out[q] = dg[q] if -bound < v < bound else np.float32(0.0)
            _recurrent_transposed(dh, dg, wg, H, K)
        dh0[g, b] = dh
        dc0[g, b] = dc


@njit(**OPTIONS)
def gru_forward(gx, bias, w, bias_hh, h0, keep, masked, heads, save, hs, h_n, acts):
    """acts per step and group: [r, z, n, h @ w_n + b_n] (4 blocks of h)."""
    G, B, H = h0.shape
    N = gx.shape[1] // B
    K = 3 * H
    for gb in prange(G * B):
        g, b = gb // B, gb % B
        direction, head = g // heads, g % heads
        gate0, unit0, act0 = direction * K, direction * H, direction * 4 * H
        h = h0[g, b].copy()
        x = np.empty(K, np.float32)
        zh = np.empty(K, np.float32)
        a = np.empty(4 * H, np.float32)
        wg = w[g]
        for s in range(N):
            t = _step(s, N, direction)
            row = b * N + t
            if masked and keep[b, t] == 0:
                hs[head, row, unit0 : unit0 + H] = h
                if save:
                    acts[head, row, act0 : act0 + 4 * H] = 0.0
                continue
            _gate_inputs(x, gx[head, row, gate0 : gate0 + K], bias[head, gate0 : gate0 + K], K)
            zh[:] = bias_hh[g]
            _recurrent(zh, h, wg, H, K)
            for q in range(2 * H):
                a[q] = _sigmoid(x[q] + zh[q])
            for q in range(H):
                a[3 * H + q] = zh[2 * H + q]
                a[2 * H + q] = _tanh(x[2 * H + q] + a[q] * zh[2 * H + q])
            for q in range(H):
                h[q] = a[2 * H + q] + a[H + q] * (h[q] - a[2 * H + q])
            hs[head, row, unit0 : unit0 + H] = h
            if save:
                acts[head, row, act0 : act0 + 4 * H] = a
        h_n[g, b] = h


@njit(**OPTIONS)
def gru_backward(gx, bias, w, h0, keep, masked, heads, acts, hs, dhs, dh_n, dgx, dgh, dh0):
    """dgx: gradients of the gate inputs (zero where bounded); dgh: of the recurrent pre-activations."""
    G, B, H = h0.shape
    N = gx.shape[1] // B
    K = 3 * H
    bound = np.float32(GATE_BOUND)
    for gb in prange(G * B):
        g, b = gb // B, gb % B
        direction, head = g // heads, g % heads
        gate0, unit0, act0 = direction * K, direction * H, direction * 4 * H
        dh = dh_n[g, b].copy()
        carry = np.empty(H, np.float32)
        dx = np.empty(K, np.float32)
        wg = w[g]
        for s in range(N - 1, -1, -1):
            t = _step(s, N, direction)
            row = b * N + t
            for q in range(H):
                dh[q] += dhs[head, row, unit0 + q]
            if masked and keep[b, t] == 0:
                dgx[head, row, gate0 : gate0 + K] = 0.0
                dgh[head, row, gate0 : gate0 + K] = 0.0
                continue
            # views that start at 0, so the loop over units vectorises
            ar, au = acts[head, row, act0 : act0 + H], acts[head, row, act0 + H : act0 + 2 * H]
            an, ahn = acts[head, row, act0 + 2 * H : act0 + 3 * H], acts[head, row, act0 + 3 * H : act0 + 4 * H]
            dr_h, du_h = dgh[head, row, gate0 : gate0 + H], dgh[head, row, gate0 + H : gate0 + 2 * H]
            dn_h = dgh[head, row, gate0 + 2 * H : gate0 + K]
            dxr, dxu, dxn = dx[:H], dx[H : 2 * H], dx[2 * H :]
            h_prev = hs[head, b * N + _step(s - 1, N, direction), unit0 : unit0 + H] if s > 0 else h0[g, b]
            for q in range(H):
                r, u, n, hn = ar[q], au[q], an[q], ahn[q]
                dn = dh[q] * (np.float32(1.0) - u) * (np.float32(1.0) - n * n)
                dr = dn * hn * r * (np.float32(1.0) - r)
                du = dh[q] * (h_prev[q] - n) * u * (np.float32(1.0) - u)
                dxr[q], dxu[q], dxn[q] = dr, du, dn
                dr_h[q], du_h[q], dn_h[q] = dr, du, dn * r
                carry[q] = dh[q] * u
            d = dgh[head, row]
            x, bias_row, out = gx[head, row, gate0 : gate0 + K], bias[head, gate0 : gate0 + K], dgx[head, row, gate0 : gate0 + K]
            for q in range(K):
                v = x[q] + bias_row[q]
                out[q] = dx[q] if -bound < v < bound else np.float32(0.0)
            _recurrent_transposed(dh, d[gate0 : gate0 + K], wg, H, K)
            for q in range(H):
                dh[q] += carry[q]
        dh0[g, b] = dh


@njit(**OPTIONS)
def weight_grads(before, dz, heads, dw, db):
    """dw[g] = sum over rows of before[g-block]^T dz[g-block]; db[g] = sum over rows of dz[g-block].

    One group per work item, rows summed in order, four at a time (each pass over dw serves four rows,
    as `_recurrent` does for w): the result does not depend on how many threads run (a BLAS product
    over this long reduction splits it by thread count, and rounds differently).
    """
    G, H, K = dw.shape
    rows = dz.shape[1]
    full = rows - rows % 4
    for g in prange(G):
        direction, head = g // heads, g % heads
        gate0, unit0 = direction * K, direction * H
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
            for j in range(H):
                a0, a1, a2, a3 = h0[j], h1[j], h2[j], h3[j]
                o = out[j]
                for q in range(K):
                    o[q] += (a0 * d0[q] + a1 * d1[q]) + (a2 * d2[q] + a3 * d3[q])
        for row in range(full, rows):
            d, h = dz[head, row, gate0 : gate0 + K], before[head, row, unit0 : unit0 + H]
            for q in range(K):
                bias[q] += d[q]
            for j in range(H):
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
