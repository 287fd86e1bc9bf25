"""Cases and references shared by the fused-attention tests (not collected itself)."""
import torch

from mmtransnext.models.position_bias import RowFactoredBias, bias_layout, expand_bias
from mmtransnext.ops.fused_attention import fused_bias_attention

# (build_query, build_key, pretrain, query_size, key_size): the bias is resized
# when the build grids differ from the run-time grids (interpolation mode).
CASES = {
    # name: (layout, batch, heads, head_dim)
    'map5x7_pool2x3_d24': (((5, 7), (2, 3), (5, 7), (5, 7), (2, 3)), 2, 3, 24),
    'pool1x1': (((5, 7), (1, 1), (5, 7), (5, 7), (1, 1)), 2, 2, 24),
    'interpolated_d13': (((9, 9), (3, 3), (9, 9), (5, 13), (1, 4)), 1, 2, 13),
    'interpolated_many_key_tiles': (((20, 20), (5, 5), (20, 20), (17, 23), (9, 10)), 1, 1, 24),
    # one column axis resized (2 taps a column), the other not (1 tap)
    'query_columns_resized': (((6, 9), (2, 3), (6, 9), (6, 13), (2, 3)), 2, 2, 24),
    'key_columns_resized': (((6, 9), (2, 3), (6, 9), (6, 9), (3, 5)), 1, 2, 16),
    # the last stage: keys on the queries' own map, P = N
    'full_attention_6x7': (((6, 7), (6, 7), (6, 7), (6, 7), (6, 7)), 1, 2, 24),
    'map2x2_below_window': (((2, 2), (1, 1), (2, 2), (2, 2), (1, 1)), 3, 1, 8),
    # both column axes resized, a map below the window
    'map2x3_resized_below_window': (((4, 4), (2, 2), (4, 4), (2, 3), (1, 3)), 3, 1, 8),
}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def make_inputs(spec, batch, heads, head_dim, seed=0):
    """float64 leaves: scaled queries, keys, values and the MLP table of the bias."""
    gen = torch.Generator().manual_seed(seed)
    layout = bias_layout(*spec, torch.device('cpu'))
    (height, width), (pool_h, pool_w) = spec[3], spec[4]
    tokens, keys = height * width, pool_h * pool_w
    # Logits of the model's magnitude: unit vectors times ~ softplus(t) * ln(9 + P).
    query = torch.nn.functional.normalize(
        torch.randn(batch, heads, tokens, head_dim, generator=gen, dtype=torch.float64), dim=-1)
    key = torch.nn.functional.normalize(
        torch.randn(batch, heads, keys, head_dim, generator=gen, dtype=torch.float64), dim=-1)
    value = torch.randn(batch, heads, keys, head_dim, generator=gen, dtype=torch.float64)
    table = torch.randn(heads, *layout.coords.shape[:2], generator=gen, dtype=torch.float64)
    return [query * 12.0, key, value, table], layout


def whole_matrix(query, key, value, table, layout):
    """The reference: the whole bias built, one softmax."""
    logits = query @ key.transpose(-2, -1) + expand_bias(table, layout)
    return logits.softmax(-1) @ value, logits.logsumexp(-1)


def gradients(fn, leaves, layout, grad_out, grad_lse, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out, lse = fn(*leaves, layout)
    loss = 0
    if grad_out is not None:
        loss = loss + (out.double() * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (lse.double() * grad_lse).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    # the values do not reach the log-sum-exp: no gradient is a zero gradient
    return (out, lse), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def fused(query, key, value, table, layout):
    return fused_bias_attention(query, key, value, RowFactoredBias(table, layout))


def assert_near(got, ref, tol, name):
    err = (got.double() - ref).abs().max().item()
    limit = tol * max(ref.abs().max().item(), 1e-6)
    assert err <= limit, f'{name}: max error {err:.3g} > {limit:.3g}'


def merged_softmax_reference(local, lse, token_weights):
    """The model's operators for the merged softmax: the window's weights plus
    ``token_weights`` and the pooled keys' weight ``(B, heads, N, 1)``."""
    attn_local, attn_pooled = torch.cat([local, lse.unsqueeze(-1)], dim=-1).softmax(
        dim=-1).split([local.shape[-1], 1], dim=-1)
    return attn_local + token_weights, attn_pooled


def offset_mlp_reference(offsets, params, grad):
    """The position-bias MLP as ``nn.Linear`` layers in float64 on every point of the grid
    of ``offsets`` (row and column offsets) with ``params`` (fc1's weight and bias, fc2's):
    the ``(heads, Uh, Uw)`` table and the four parameters' gradients for ``grad``."""
    hidden, heads = params[0].shape[0], params[3].shape[0]
    fc1, fc2 = torch.nn.Linear(2, hidden).double(), torch.nn.Linear(hidden, heads).double()
    layers = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    with torch.no_grad():
        for layer_param, value in zip(layers, params):
            layer_param.copy_(value)
    coords = torch.stack(torch.meshgrid(*offsets, indexing='ij'), dim=-1)
    table = fc2(torch.relu(fc1(coords))).permute(2, 0, 1)
    return table.detach(), torch.autograd.grad(table, layers, grad)


def record_calls(monkeypatch, module, names) -> list:
    """Each function ``names`` of ``module``, as the module looks it up, wrapped to record
    its calls: returns the list the wrappers append the called names to, in order."""
    calls = []
    for name in names:
        def recorded(*args, function=getattr(module, name), name=name):
            calls.append(name)
            return function(*args)
        monkeypatch.setattr(module, name, recorded)
    return calls
