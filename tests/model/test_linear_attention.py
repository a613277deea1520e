"""The Gated DeltaNet pieces against a token-by-token float64 reference: the chunked rule (any cut
points, any initial state), the recurrent rule for a batch of sequences, the causal convolution and
its state, and the states the chunked rule reports at its cuts (what prefix caching snapshots)."""

import pytest
import torch
import torch.nn.functional as F

from mesh.model import linear_attention as gdn


def _reference(q, k, v, g, beta, state):
    """The rule as its definition reads, one token at a time, in float64."""
    rep = v.shape[1] // q.shape[1]
    q = F.normalize(q.double(), dim=-1, eps=0).repeat_interleave(rep, 1) * q.shape[-1] ** -0.5
    k = F.normalize(k.double(), dim=-1, eps=0).repeat_interleave(rep, 1)
    s, outs, states = state.double().clone(), [], []
    for t in range(q.shape[0]):
        s = s * g[t].double().exp()[:, None, None]
        u = beta[t].double()[:, None] * (v[t].double() - torch.einsum("hkv,hk->hv", s, k[t]))
        s = s + torch.einsum("hk,hv->hkv", k[t], u)
        outs.append(torch.einsum("hkv,hk->hv", s, q[t]))
        states.append(s.clone())
    return torch.stack(outs), states


def _inputs(t, hk=2, hv=4, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, t, hk, dk, generator=g)
    v = torch.randn(t, hv, dv, generator=g)
    decay = -torch.rand(t, hv, generator=g) * 0.5  # log decays <= 0
    beta = torch.rand(t, hv, generator=g)
    state = torch.randn(hv, dk, dv, generator=g) * 0.3
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("t,cuts", [(1, []), (5, [2]), (70, [16, 32, 48, 64]), (130, [7, 100]), (16, [16])])
def test_chunked_rule_matches_the_token_by_token_reference(t, cuts):
    q, k, v, g, beta, state = _inputs(t)
    want, states = _reference(q, k, v, g, beta, state)
    out, final, at = gdn.chunked(q, k, v, g, beta, state, cuts)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final.double(), states[-1], atol=1e-4, rtol=1e-4)
    assert len(at) == len(cuts)
    for c, s in zip(cuts, at):  # the state after the first c tokens
        torch.testing.assert_close(s.double(), states[c - 1], atol=1e-4, rtol=1e-4)


def test_recurrent_rule_runs_a_batch_of_sequences_one_token_each():
    seqs = [_inputs(3, seed=i) for i in range(5)]
    # a batch of 5 sequences: each one's first token (q, k, v, g, beta) and its own state
    q, k, v, g, beta, state = (torch.stack([s[j][0] if j < 5 else s[j] for s in seqs]) for j in range(6))
    out, new = gdn.recurrent(q, k, v, g, beta, state)
    for i, s in enumerate(seqs):
        want, states = _reference(s[0][:1], s[1][:1], s[2][:1], s[3][:1], s[4][:1], s[5])
        torch.testing.assert_close(out[i].double(), want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new[i].double(), states[0], atol=1e-5, rtol=1e-5)


def test_prefill_in_pieces_then_decode_equals_one_pass():
    q, k, v, g, beta, state = _inputs(40, seed=3)
    whole, _, _ = gdn.chunked(q, k, v, g, beta, state)
    a, s, _ = gdn.chunked(q[:17], k[:17], v[:17], g[:17], beta[:17], state)
    b, s, _ = gdn.chunked(q[17:39], k[17:39], v[17:39], g[17:39], beta[17:39], s)
    c, s = gdn.recurrent(q[39:], k[39:], v[39:], g[39:], beta[39:], s[None])
    torch.testing.assert_close(torch.cat([a, b, c]), whole, atol=1e-5, rtol=1e-5)


def test_causal_conv_and_its_state_over_chunks_and_single_tokens():
    g = torch.Generator().manual_seed(5)
    c, kernel, t = 6, 4, 11
    x, w = torch.randn(t, c, generator=g), torch.randn(c, kernel, generator=g)
    want = F.silu(F.conv1d(x.t()[None], w[:, None, :], padding=kernel - 1, groups=c)[0, :, :t]).t()
    zero = torch.zeros(c, kernel - 1)
    y1, s1 = gdn.causal_conv(x[:5], w, zero)
    y2, s2 = gdn.causal_conv(x[5:10], w, s1)
    y3, s3 = gdn.conv_step(x[10:], w, s2[None])
    torch.testing.assert_close(torch.cat([y1, y2, y3]), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s3[0], x[8:11].t())  # the last K-1 inputs
    snaps = gdn.conv_states_at(x[:5], zero, [1, 3, 5])  # what a snapshot at those token counts holds
    assert torch.equal(snaps[0][:, -1], x[0]) and torch.equal(snaps[0][:, :2], zero[:, :2])
    assert torch.equal(snaps[2], s1)


def test_state_pool_slots_reset_copy_and_round_trip():
    pool = gdn.StatePool(num_layers=2, num_slots=3, conv_dim=5, kernel=4, value_heads=2, key_dim=3, value_dim=4)
    assert pool.conv.shape == (2, 3, 5, 3) and pool.ssm.shape == (2, 3, 2, 3, 4)
    assert gdn.StatePool.bytes_per_slot(2, 5, 4, 2, 3, 4) == 2 * (5 * 3 + 2 * 3 * 4) * 4
    pool.conv[:, 1].normal_()
    pool.ssm[:, 1].normal_()
    pool.copy(1, 2)
    conv, ssm = pool.read(2)
    assert torch.equal(conv, pool.conv[:, 1]) and torch.equal(ssm, pool.ssm[:, 1])
    pool.reset(1)
    assert not pool.conv[:, 1].any() and not pool.ssm[:, 1].any()
    pool.write(0, conv, ssm)
    assert torch.equal(pool.ssm[:, 0], pool.ssm[:, 2])
