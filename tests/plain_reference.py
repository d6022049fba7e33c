"""Plain, functional reference implementation of the SAM-Med3D network (test use only).

Written independently from the written specification (``shared/reference/sam-med3d.md``,
sections 1 and 2). Every function takes a state dict ``sd`` (a plain ``dict`` mapping the
upstream key names, e.g. ``image_encoder.blocks.3.attn.qkv.weight``, to tensors) and computes
its result with explicit tensor operations: no ``nn.Module``, no fused attention kernels.
It is deliberately slow and simple; its only purpose is to check another implementation.

The relative-position bias is written out with explicit index arithmetic from the corrected §1 ("Quirk",
2026-12): an earlier version of this file, like the earlier specification, used the textbook decomposed bias,
which the released weights were not trained with, so it repeated the specification's mistake. The upstream
formula is the default (``config["rel_pos_bias"] = "upstream"``); ``"decomposed"`` (the shipped lite model's)
is the other choice. Parity with numbers the upstream code itself computed is tested separately
(``tests/test_upstream_parity.py``).

Public functions
----------------
- ``REFERENCE_CONFIG``                       the released ("vit_b_ori") configuration
- ``expected_state_dict_shapes(config)``     every state-dict key -> shape
- ``expected_parameter_count(config)``       number of parameters (the Gaussian buffer excluded)
- ``reference_encode(sd, image, config)``    (B,1,S,S,S) -> (B,out_chans,g,g,g)
- ``reference_dense_pe(sd, grid)``           (1,out_chans,g0,g1,g2)
- ``reference_point_embedding(sd, coords, labels, image_size)``  (B,N+1,out_chans)
- ``reference_mask_embedding(sd, mask_input)``                   (B,out_chans,g,g,g)
- ``reference_decode(sd, embedding, coords, labels, mask_input, config)``
                                             -> (low-res logits (B,1,4g,4g,4g), iou (B,1))
- ``reference_forward(sd, image, coords, labels, mask_input, config)`` -> (B,1,S,S,S)

Choices where the specification leaves room (documented here once):
- Dense positional encoding on a non-cubic grid (g0, g1, g2): cell (i0, i1, i2) is encoded
  from ((i1 + 0.5)/g1, (i0 + 0.5)/g0, (i2 + 0.5)/g2), i.e. each index is normalised by the
  size of its own axis and then axes 0 and 1 are swapped. The spec only states the cubic case
  ((i1+0.5)/8, (i0+0.5)/8, (i2+0.5)/8); for cubes every reading agrees.
- Windowed blocks when the token grid g exceeds window_size: the grid is zero-padded at the
  end of each axis to the next multiple of window_size and split into non-overlapping
  windows of window_size^3 tokens; each window attends within itself without a mask.
- ``reference_decode`` requires the embedding and the prompts to share the batch size B
  (an embedding with batch 1 is broadcast to the prompts' batch).
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "REFERENCE_CONFIG",
    "expected_state_dict_shapes",
    "expected_parameter_count",
    "reference_encode",
    "reference_dense_pe",
    "reference_point_embedding",
    "reference_mask_embedding",
    "reference_decode",
    "reference_forward",
]

REFERENCE_CONFIG = {
    "image_size": 128,
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "global_attn_indexes": (2, 5, 8, 11),
    "window_size": 14,
    "mlp_ratio": 4,
    "out_chans": 384,
    "decoder_depth": 2,
    "decoder_heads": 8,
    "decoder_mlp_dim": 2048,
    "attention_downsample_rate": 2,
    "num_mask_tokens": 4,
    "iou_head_hidden_dim": 256,
    "iou_head_depth": 3,
    "mask_in_chans": 16,
    "rel_pos_bias": "upstream",
}

GAUSSIAN_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def _cfg(config):
    """Released configuration updated with ``config`` (missing keys take released values)."""
    merged = dict(REFERENCE_CONFIG)
    if config is not None:
        merged.update(config)
    return merged


# --------------------------------------------------------------------------------------------
# State-dict shapes
# --------------------------------------------------------------------------------------------


def expected_state_dict_shapes(config):
    """Every state-dict key (upstream names) and its shape for ``config``.

    Returns a dict ``name -> tuple[int, ...]`` including the Gaussian buffer
    ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`` (3, out_chans // 3).
    For the released config: 324 keys (189 image_encoder., 15 prompt_encoder., 120 mask_decoder.).
    """
    c = _cfg(config)
    C = c["embed_dim"]
    p = c["patch_size"]
    g = c["image_size"] // p
    heads = c["num_heads"]
    hd = C // heads
    ws = c["window_size"]
    hidden = int(C * c["mlp_ratio"])
    out = c["out_chans"]
    shapes = {}

    # ---- image encoder
    e = "image_encoder."
    shapes[e + "pos_embed"] = (1, g, g, g, C)
    shapes[e + "patch_embed.proj.weight"] = (C, 1, p, p, p)
    shapes[e + "patch_embed.proj.bias"] = (C,)
    for i in range(c["depth"]):
        b = f"{e}blocks.{i}."
        K = g if i in tuple(c["global_attn_indexes"]) else ws
        shapes[b + "norm1.weight"] = (C,)
        shapes[b + "norm1.bias"] = (C,)
        shapes[b + "attn.rel_pos_d"] = (2 * K - 1, hd)
        shapes[b + "attn.rel_pos_h"] = (2 * K - 1, hd)
        shapes[b + "attn.rel_pos_w"] = (2 * K - 1, hd)
        shapes[b + "attn.qkv.weight"] = (3 * C, C)
        shapes[b + "attn.qkv.bias"] = (3 * C,)
        shapes[b + "attn.proj.weight"] = (C, C)
        shapes[b + "attn.proj.bias"] = (C,)
        shapes[b + "norm2.weight"] = (C,)
        shapes[b + "norm2.bias"] = (C,)
        shapes[b + "mlp.lin1.weight"] = (hidden, C)
        shapes[b + "mlp.lin1.bias"] = (hidden,)
        shapes[b + "mlp.lin2.weight"] = (C, hidden)
        shapes[b + "mlp.lin2.bias"] = (C,)
    shapes[e + "neck.0.weight"] = (out, C, 1, 1, 1)
    shapes[e + "neck.1.weight"] = (out,)
    shapes[e + "neck.1.bias"] = (out,)
    shapes[e + "neck.2.weight"] = (out, out, 3, 3, 3)
    shapes[e + "neck.3.weight"] = (out,)
    shapes[e + "neck.3.bias"] = (out,)

    # ---- prompt encoder
    pe = "prompt_encoder."
    mic = c["mask_in_chans"]
    shapes[GAUSSIAN_KEY] = (3, out // 3)
    shapes[pe + "point_embeddings.0.weight"] = (1, out)
    shapes[pe + "point_embeddings.1.weight"] = (1, out)
    shapes[pe + "not_a_point_embed.weight"] = (1, out)
    shapes[pe + "no_mask_embed.weight"] = (1, out)
    shapes[pe + "mask_downscaling.0.weight"] = (mic // 4, 1, 2, 2, 2)
    shapes[pe + "mask_downscaling.0.bias"] = (mic // 4,)
    shapes[pe + "mask_downscaling.1.weight"] = (mic // 4,)
    shapes[pe + "mask_downscaling.1.bias"] = (mic // 4,)
    shapes[pe + "mask_downscaling.3.weight"] = (mic, mic // 4, 2, 2, 2)
    shapes[pe + "mask_downscaling.3.bias"] = (mic,)
    shapes[pe + "mask_downscaling.4.weight"] = (mic,)
    shapes[pe + "mask_downscaling.4.bias"] = (mic,)
    shapes[pe + "mask_downscaling.6.weight"] = (out, mic, 1, 1, 1)
    shapes[pe + "mask_downscaling.6.bias"] = (out,)

    # ---- mask decoder
    md = "mask_decoder."
    t = md + "transformer."
    inner = out // c["attention_downsample_rate"]
    mlp_dim = c["decoder_mlp_dim"]

    def attn_shapes(prefix, internal):
        shapes[prefix + "q_proj.weight"] = (internal, out)
        shapes[prefix + "q_proj.bias"] = (internal,)
        shapes[prefix + "k_proj.weight"] = (internal, out)
        shapes[prefix + "k_proj.bias"] = (internal,)
        shapes[prefix + "v_proj.weight"] = (internal, out)
        shapes[prefix + "v_proj.bias"] = (internal,)
        shapes[prefix + "out_proj.weight"] = (out, internal)
        shapes[prefix + "out_proj.bias"] = (out,)

    for li in range(c["decoder_depth"]):
        lp = f"{t}layers.{li}."
        attn_shapes(lp + "self_attn.", out)
        shapes[lp + "norm1.weight"] = (out,)
        shapes[lp + "norm1.bias"] = (out,)
        attn_shapes(lp + "cross_attn_token_to_image.", inner)
        shapes[lp + "norm2.weight"] = (out,)
        shapes[lp + "norm2.bias"] = (out,)
        shapes[lp + "mlp.lin1.weight"] = (mlp_dim, out)
        shapes[lp + "mlp.lin1.bias"] = (mlp_dim,)
        shapes[lp + "mlp.lin2.weight"] = (out, mlp_dim)
        shapes[lp + "mlp.lin2.bias"] = (out,)
        shapes[lp + "norm3.weight"] = (out,)
        shapes[lp + "norm3.bias"] = (out,)
        shapes[lp + "norm4.weight"] = (out,)
        shapes[lp + "norm4.bias"] = (out,)
        attn_shapes(lp + "cross_attn_image_to_token.", inner)
    attn_shapes(t + "final_attn_token_to_image.", inner)
    shapes[t + "norm_final_attn.weight"] = (out,)
    shapes[t + "norm_final_attn.bias"] = (out,)

    nmt = c["num_mask_tokens"]
    shapes[md + "iou_token.weight"] = (1, out)
    shapes[md + "mask_tokens.weight"] = (nmt, out)
    shapes[md + "output_upscaling.0.weight"] = (out, out // 4, 2, 2, 2)
    shapes[md + "output_upscaling.0.bias"] = (out // 4,)
    shapes[md + "output_upscaling.1.weight"] = (out // 4,)
    shapes[md + "output_upscaling.1.bias"] = (out // 4,)
    shapes[md + "output_upscaling.3.weight"] = (out // 4, out // 8, 2, 2, 2)
    shapes[md + "output_upscaling.3.bias"] = (out // 8,)
    for m in range(nmt):
        hp = f"{md}output_hypernetworks_mlps.{m}.layers."
        dims = [out, out, out, out // 8]
        for li in range(3):
            shapes[f"{hp}{li}.weight"] = (dims[li + 1], dims[li])
            shapes[f"{hp}{li}.bias"] = (dims[li + 1],)
    ih = md + "iou_prediction_head.layers."
    hid = c["iou_head_hidden_dim"]
    depth = c["iou_head_depth"]
    dims = [out] + [hid] * (depth - 1) + [nmt]
    for li in range(depth):
        shapes[f"{ih}{li}.weight"] = (dims[li + 1], dims[li])
        shapes[f"{ih}{li}.bias"] = (dims[li + 1],)
    return shapes


def expected_parameter_count(config):
    """Sum of ``prod(shape)`` over all keys except the Gaussian buffer (released: 100,509,232)."""
    total = 0
    for name, shape in expected_state_dict_shapes(config).items():
        if name == GAUSSIAN_KEY:
            continue
        total += math.prod(shape)
    return total


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def _linear(sd, prefix, x):
    """``x @ W^T + b`` with ``W = sd[prefix+'weight']``, ``b = sd[prefix+'bias']``."""
    return F.linear(x, sd[prefix + "weight"], sd.get(prefix + "bias"))


def _layer_norm(sd, prefix, x, eps):
    """LayerNorm over the last dimension of ``x``."""
    w = sd[prefix + "weight"]
    return F.layer_norm(x, (w.shape[0],), w, sd[prefix + "bias"], eps)


def _layer_norm_3d(sd, prefix, x, eps=1e-6):
    """LayerNorm3d: x (B, C, D, H, W); normalise over C per voxel (biased variance)."""
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    w = sd[prefix + "weight"].view(1, -1, 1, 1, 1)
    b = sd[prefix + "bias"].view(1, -1, 1, 1, 1)
    return y * w + b


def _softmax_last(x):
    """Numerically stable softmax over the last dimension, written out."""
    x = x - x.max(dim=-1, keepdim=True).values
    e = torch.exp(x)
    return e / e.sum(dim=-1, keepdim=True)


def _mlp_relu(sd, prefix, x, num_layers):
    """MLP ``prefix + 'layers.{i}.'`` with ReLU between layers (none after the last)."""
    for i in range(num_layers):
        x = _linear(sd, f"{prefix}layers.{i}.", x)
        if i < num_layers - 1:
            x = torch.relu(x)
    return x


# --------------------------------------------------------------------------------------------
# Image encoder
# --------------------------------------------------------------------------------------------


def _token_coordinates(K, device):
    """(d, h, w) coordinates, each a LongTensor (N,), of the tokens of a K^3 grid in row-major order."""
    ar = torch.arange(K, device=device)
    dd, hh, ww = torch.meshgrid(ar, ar, ar, indexing="ij")
    return dd.reshape(-1), hh.reshape(-1), ww.reshape(-1)


def _bias_indices(K, device, rel_pos_bias):
    """For every (query i, key j) pair of a K^3 grid, three (token, table row) index pairs: the bias is
    ``sum over the three axes of q[token] . T_axis[row]``. Returns a list of three (token (N, N), row (N, N)).

    With ``o(a, b) = a - b + K - 1`` and ``t(d, h, w) = (d * K + h) * K + w`` the token's flat index:
    - "decomposed" (textbook): q[t(i)] . T_d[o(i_d, j_d)] + q[t(i)] . T_h[o(i_h, j_h)] + q[t(i)] . T_w[o(i_w, j_w)]
    - "upstream" (sam-med3d.md §1, "Quirk", corrected): q[t(i_d, i_h, i_w)] . T_d[o(i_d, j_w)]
      + q[t(i_d, i_h, j_d)] . T_h[o(i_h, j_w)] + q[t(i_d, i_h, j_h)] . T_w[o(j_h, j_w)]
    """
    d, h, w = _token_coordinates(K, device)
    i_d, i_h, i_w = d[:, None], h[:, None], w[:, None]  # query coordinates, along rows
    j_d, j_h, j_w = d[None, :], h[None, :], w[None, :]  # key coordinates, along columns

    def o(a, b):
        return a - b + (K - 1)

    def t(dd, hh, ww):
        return (dd * K + hh) * K + ww

    N = K**3
    if rel_pos_bias == "decomposed":
        query = t(i_d, i_h, i_w).expand(N, N)
        return [(query, o(i_d, j_d)), (query, o(i_h, j_h)), (query, o(i_w, j_w))]
    if rel_pos_bias == "upstream":
        return [
            (t(i_d, i_h, i_w).expand(N, N), o(i_d, j_w).expand(N, N)),
            (t(i_d, i_h, j_d).expand(N, N), o(i_h, j_w).expand(N, N)),
            (t(i_d, i_h, j_h).expand(N, N), o(j_h, j_w).expand(N, N)),
        ]
    raise ValueError(f"unknown rel_pos_bias {rel_pos_bias!r}")


def _encoder_attention(sd, prefix, x, num_heads, rel_pos_bias="upstream"):
    """Multi-head self-attention with a 3D relative position bias (see ``_bias_indices``).

    x: (B, K, K, K, C), a cubic grid of tokens (a window or the full grid).
    The rel-pos tables ``prefix + 'rel_pos_{d,h,w}'`` must have 2K - 1 rows.
    Returns (B, K, K, K, C).
    """
    B, K, K1, K2, C = x.shape
    assert K == K1 == K2, "attention grid must be cubic"
    N = K * K * K
    hd = C // num_heads
    scale = hd**-0.5

    tokens = x.reshape(B, N, C)
    qkv = _linear(sd, prefix + "qkv.", tokens)  # (B, N, 3C)
    qkv = qkv.reshape(B, N, 3, num_heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, heads, N, hd)

    tables = [sd[prefix + "rel_pos_d"], sd[prefix + "rel_pos_h"], sd[prefix + "rel_pos_w"]]
    for t in tables:
        assert t.shape[0] == 2 * K - 1, (t.shape, K)
    indices = _bias_indices(K, x.device, rel_pos_bias)

    head_outputs = []
    for h in range(num_heads):  # one head at a time (memory)
        qh, kh, vh = q[:, h], k[:, h], v[:, h]  # (B, N, hd)
        logits = (qh * scale) @ kh.transpose(-1, -2)  # (B, N, N)
        for table, (token, row) in zip(tables, indices):
            # q[token] . T[row] for every (token, row) pair, unscaled q
            q_dot_table = qh @ table.t()  # (B, N, 2K-1)
            logits = logits + q_dot_table[:, token, row]
        attn = _softmax_last(logits)
        head_outputs.append(attn @ vh)  # (B, N, hd)
    out = torch.stack(head_outputs, dim=2)  # (B, N, heads, hd)
    out = out.reshape(B, N, C)  # heads concatenated
    out = _linear(sd, prefix + "proj.", out)
    return out.reshape(B, K, K, K, C)


def _windowed_attention(sd, prefix, x, num_heads, window_size, rel_pos_bias="upstream"):
    """Quirky windowed attention: zero-pad at the end of each axis, attend per window, crop.

    x: (B, g, g, g, C) (already normalised by norm1). The grid is padded with zeros to
    P = ceil(g / ws) * ws per axis (P = ws when g <= ws), split into (P/ws)^3 windows of ws^3
    tokens, each window attends over all its tokens (padded ones included, no mask), then
    windows are put back and the padding is cropped. Returns (B, g, g, g, C).
    """
    B, g0, g1, g2, C = x.shape
    ws = window_size
    P = [((s + ws - 1) // ws) * ws for s in (g0, g1, g2)]
    padded = torch.zeros(B, P[0], P[1], P[2], C, dtype=x.dtype, device=x.device)
    padded[:, :g0, :g1, :g2, :] = x
    n0, n1, n2 = P[0] // ws, P[1] // ws, P[2] // ws
    windows = padded.reshape(B, n0, ws, n1, ws, n2, ws, C)
    windows = windows.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B * n0 * n1 * n2, ws, ws, ws, C)
    windows = _encoder_attention(sd, prefix, windows, num_heads, rel_pos_bias)
    windows = windows.reshape(B, n0, n1, n2, ws, ws, ws, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
    padded = windows.reshape(B, P[0], P[1], P[2], C)
    return padded[:, :g0, :g1, :g2, :]


def reference_encode(sd, image, config):
    """Image encoder. image (B, 1, S, S, S), S = image_size -> embedding (B, out_chans, g, g, g).

    g = S // patch_size. Patch embedding + pos_embed, ``depth`` pre-norm ViT blocks (windowed
    or global attention), neck (conv1x1, LayerNorm3d, conv3x3x3, LayerNorm3d).
    """
    c = _cfg(config)
    e = "image_encoder."
    p = c["patch_size"]
    heads = c["num_heads"]
    glob = tuple(c["global_attn_indexes"])

    x = F.conv3d(image, sd[e + "patch_embed.proj.weight"], sd[e + "patch_embed.proj.bias"], stride=p)  # (B, C, g, g, g)
    x = x.permute(0, 2, 3, 4, 1)  # (B, g, g, g, C)
    x = x + sd[e + "pos_embed"]

    for i in range(c["depth"]):
        b = f"{e}blocks.{i}."
        shortcut = x
        y = _layer_norm(sd, b + "norm1.", x, 1e-6)
        if i in glob:
            y = _encoder_attention(sd, b + "attn.", y, heads, c["rel_pos_bias"])
        else:
            y = _windowed_attention(sd, b + "attn.", y, heads, c["window_size"], c["rel_pos_bias"])
        x = shortcut + y
        y = _layer_norm(sd, b + "norm2.", x, 1e-6)
        y = _linear(sd, b + "mlp.lin1.", y)
        y = F.gelu(y)  # exact (erf) GELU
        y = _linear(sd, b + "mlp.lin2.", y)
        x = x + y

    x = x.permute(0, 4, 1, 2, 3)  # (B, C, g, g, g)
    x = F.conv3d(x, sd[e + "neck.0.weight"])
    x = _layer_norm_3d(sd, e + "neck.1.", x)
    x = F.conv3d(x, sd[e + "neck.2.weight"], padding=1)
    x = _layer_norm_3d(sd, e + "neck.3.", x)
    return x


# --------------------------------------------------------------------------------------------
# Prompt encoder
# --------------------------------------------------------------------------------------------


def _fourier_encode(sd, coords01):
    """Random-Fourier encoding. coords01 (..., 3) in [0, 1] -> (..., out_chans).

    c' = 2c - 1; p = 2*pi * c' @ G; out = cat([sin p, cos p, sin p]).
    """
    G = sd[GAUSSIAN_KEY]  # (3, out_chans // 3)
    cc = 2.0 * coords01 - 1.0
    proj = 2.0 * math.pi * (cc @ G.to(cc.dtype))
    return torch.cat([torch.sin(proj), torch.cos(proj), torch.sin(proj)], dim=-1)


def reference_dense_pe(sd, grid):
    """Dense positional encoding of the image grid -> (1, out_chans, g0, g1, g2).

    ``grid`` is an int g (cube) or a tuple (g0, g1, g2). Quirk: cell (i0, i1, i2) uses the
    coordinate vector ((i1 + 0.5)/g1, (i0 + 0.5)/g0, (i2 + 0.5)/g2) (axes 0 and 1 swapped).
    """
    if isinstance(grid, int):
        grid = (grid, grid, grid)
    g0, g1, g2 = (int(s) for s in grid)
    G = sd[GAUSSIAN_KEY]
    dtype = G.dtype if G.is_floating_point() else torch.float32
    i0 = (torch.arange(g0, dtype=dtype) + 0.5) / g0
    i1 = (torch.arange(g1, dtype=dtype) + 0.5) / g1
    i2 = (torch.arange(g2, dtype=dtype) + 0.5) / g2
    a0, a1, a2 = torch.meshgrid(i0, i1, i2, indexing="ij")  # each (g0, g1, g2)
    coords = torch.stack([a1, a0, a2], dim=-1)  # swap of axes 0 and 1
    pe = _fourier_encode(sd, coords)  # (g0, g1, g2, out)
    return pe.permute(3, 0, 1, 2).unsqueeze(0)


def reference_point_embedding(sd, coords, labels, image_size):
    """Sparse prompt embedding. coords (B, N, 3) voxel indices (array order), labels (B, N).

    A padding point (0, 0, 0) with label -1 is appended. Point p is encoded from
    ((p0 + 0.5)/S0, (p1 + 0.5)/S1, (p2 + 0.5)/S2) with S = image_size (no axis swap).
    Label -1: encoding zeroed, + not_a_point_embed; label 0: + point_embeddings.0;
    label 1: + point_embeddings.1. Returns (B, N + 1, out_chans).
    """
    pe = "prompt_encoder."
    if isinstance(image_size, int):
        image_size = (image_size, image_size, image_size)
    size = torch.tensor([float(s) for s in image_size], dtype=torch.float32)
    coords = coords.to(torch.float32)
    labels = labels.to(torch.long)
    B = coords.shape[0]
    coords = torch.cat([coords, torch.zeros(B, 1, 3, dtype=coords.dtype)], dim=1)
    labels = torch.cat([labels, -torch.ones(B, 1, dtype=labels.dtype)], dim=1)

    emb = _fourier_encode(sd, (coords + 0.5) / size)  # (B, N+1, out)
    not_point = (labels == -1).unsqueeze(-1).to(emb.dtype)
    neg = (labels == 0).unsqueeze(-1).to(emb.dtype)
    pos = (labels == 1).unsqueeze(-1).to(emb.dtype)
    emb = emb * (1.0 - not_point)
    emb = emb + not_point * sd[pe + "not_a_point_embed.weight"][0]
    emb = emb + neg * sd[pe + "point_embeddings.0.weight"][0]
    emb = emb + pos * sd[pe + "point_embeddings.1.weight"][0]
    return emb


def reference_mask_embedding(sd, mask_input):
    """Dense mask embedding. mask_input (B, 1, 4g, 4g, 4g) -> (B, out_chans, g, g, g)."""
    m = "prompt_encoder.mask_downscaling."
    x = F.conv3d(mask_input, sd[m + "0.weight"], sd[m + "0.bias"], stride=2)
    x = _layer_norm_3d(sd, m + "1.", x)
    x = F.gelu(x)
    x = F.conv3d(x, sd[m + "3.weight"], sd[m + "3.bias"], stride=2)
    x = _layer_norm_3d(sd, m + "4.", x)
    x = F.gelu(x)
    x = F.conv3d(x, sd[m + "6.weight"], sd[m + "6.bias"])
    return x


# --------------------------------------------------------------------------------------------
# Mask decoder
# --------------------------------------------------------------------------------------------


def _decoder_attention(sd, prefix, q, k, v, num_heads):
    """Decoder attention. q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).

    Projections to the internal width Ci (C or C / downsample), heads as contiguous chunks
    of Ci / heads channels, softmax(q k^T / sqrt(Ci / heads)) v, heads recombined, out_proj.
    """
    q = _linear(sd, prefix + "q_proj.", q)
    k = _linear(sd, prefix + "k_proj.", k)
    v = _linear(sd, prefix + "v_proj.", v)
    B, Nq, Ci = q.shape
    Nk = k.shape[1]
    ch = Ci // num_heads
    q = q.reshape(B, Nq, num_heads, ch).transpose(1, 2)  # (B, heads, Nq, ch)
    k = k.reshape(B, Nk, num_heads, ch).transpose(1, 2)
    v = v.reshape(B, Nk, num_heads, ch).transpose(1, 2)
    attn = _softmax_last((q @ k.transpose(-1, -2)) / math.sqrt(ch))
    out = (attn @ v).transpose(1, 2).reshape(B, Nq, Ci)
    return _linear(sd, prefix + "out_proj.", out)


def _two_way_transformer(sd, image_tokens, image_pe, point_tokens, c):
    """Two-way transformer. image_tokens, image_pe (B, M, C); point_tokens (B, T, C).

    Returns (queries (B, T, C), keys (B, M, C)).
    """
    t = "mask_decoder.transformer."
    heads = c["decoder_heads"]
    eps = 1e-5
    queries, keys = point_tokens, image_tokens
    query_pe, key_pe = point_tokens, image_pe

    for li in range(c["decoder_depth"]):
        lp = f"{t}layers.{li}."
        if li == 0:
            queries = _decoder_attention(sd, lp + "self_attn.", queries, queries, queries, heads)
        else:
            qq = queries + query_pe
            queries = queries + _decoder_attention(sd, lp + "self_attn.", qq, qq, queries, heads)
        queries = _layer_norm(sd, lp + "norm1.", queries, eps)

        qq = queries + query_pe
        kk = keys + key_pe
        queries = queries + _decoder_attention(sd, lp + "cross_attn_token_to_image.", qq, kk, keys, heads)
        queries = _layer_norm(sd, lp + "norm2.", queries, eps)

        h = torch.relu(_linear(sd, lp + "mlp.lin1.", queries))
        queries = queries + _linear(sd, lp + "mlp.lin2.", h)
        queries = _layer_norm(sd, lp + "norm3.", queries, eps)

        qq = queries + query_pe
        kk = keys + key_pe
        keys = keys + _decoder_attention(sd, lp + "cross_attn_image_to_token.", kk, qq, queries, heads)
        keys = _layer_norm(sd, lp + "norm4.", keys, eps)

    qq = queries + query_pe
    kk = keys + key_pe
    queries = queries + _decoder_attention(sd, t + "final_attn_token_to_image.", qq, kk, keys, heads)
    queries = _layer_norm(sd, t + "norm_final_attn.", queries, eps)
    return queries, keys


def reference_decode(sd, embedding, coords, labels, mask_input, config):
    """Prompt encoder + mask decoder.

    embedding (B, C, g, g, g); coords (B, N, 3) and labels (B, N) or both None (no sparse
    prompt at all, not even the padding point); mask_input (B, 1, 4g, 4g, 4g) or None (a zero
    mask is then used). Returns (low_res_logits (B, 1, 4g, 4g, 4g), iou (B, 1)).
    """
    c = _cfg(config)
    md = "mask_decoder."
    B_emb, C, g0, g1, g2 = embedding.shape
    B = B_emb
    if coords is not None:
        B = max(B, coords.shape[0])
    if mask_input is not None:
        B = max(B, mask_input.shape[0])
    if B_emb != B:
        assert B_emb == 1, "embedding batch must be 1 or match the prompts"
        embedding = embedding.expand(B, C, g0, g1, g2)

    # sparse prompts
    if coords is None:
        sparse = torch.zeros(B, 0, C, dtype=embedding.dtype)
    else:
        sparse = reference_point_embedding(sd, coords, labels, c["image_size"]).to(embedding.dtype)

    # dense prompt
    if mask_input is None:
        mask_input = torch.zeros(B, 1, 4 * g0, 4 * g1, 4 * g2, dtype=embedding.dtype)
    dense = reference_mask_embedding(sd, mask_input.to(embedding.dtype))  # (B, C, g, g, g)
    dense_pe = reference_dense_pe(sd, (g0, g1, g2)).to(embedding.dtype)  # (1, C, g, g, g)

    nmt = c["num_mask_tokens"]
    out_tokens = torch.cat([sd[md + "iou_token.weight"], sd[md + "mask_tokens.weight"]], dim=0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(B, -1, -1), sparse], dim=1)  # (B, T, C)

    src = embedding + dense
    M = g0 * g1 * g2
    image_tokens = src.reshape(B, C, M).transpose(1, 2)  # (B, M, C), (d, h, w) order
    image_pe = dense_pe.reshape(1, C, M).transpose(1, 2).expand(B, M, C)

    hs, keys = _two_way_transformer(sd, image_tokens, image_pe, tokens, c)
    iou_token_out = hs[:, 0, :]  # (B, C)
    mask_tokens_out = hs[:, 1 : 1 + nmt, :]  # (B, nmt, C)

    x = keys.transpose(1, 2).reshape(B, C, g0, g1, g2)
    x = F.conv_transpose3d(x, sd[md + "output_upscaling.0.weight"], sd[md + "output_upscaling.0.bias"], stride=2)
    x = _layer_norm_3d(sd, md + "output_upscaling.1.", x)
    x = F.gelu(x)
    x = F.conv_transpose3d(x, sd[md + "output_upscaling.3.weight"], sd[md + "output_upscaling.3.bias"], stride=2)
    x = F.gelu(x)  # (B, C/8, 4g0, 4g1, 4g2)
    Cu = x.shape[1]

    hyper = torch.stack(
        [_mlp_relu(sd, f"{md}output_hypernetworks_mlps.{m}.", mask_tokens_out[:, m, :], 3) for m in range(nmt)], dim=1
    )  # (B, nmt, C/8)
    masks = (hyper @ x.reshape(B, Cu, -1)).reshape(B, nmt, 4 * g0, 4 * g1, 4 * g2)
    iou = _mlp_relu(sd, md + "iou_prediction_head.", iou_token_out, c["iou_head_depth"])
    return masks[:, :1], iou[:, :1]


def reference_forward(sd, image, coords, labels, mask_input, config):
    """Full network: image (B, 1, S, S, S) -> logits (B, 1, S, S, S).

    Encode, decode, then trilinear upsampling of the low-res logits (align_corners=False).
    """
    embedding = reference_encode(sd, image, config)
    low, _ = reference_decode(sd, embedding, coords, labels, mask_input, config)
    return F.interpolate(low, size=tuple(image.shape[-3:]), mode="trilinear", align_corners=False)
