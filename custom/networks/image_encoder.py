"""The SAM-Med3D image encoder: a 3D ViT with a relative-position bias and a convolutional neck.

Shapes use ``g = image_size // patch_size`` (8 for the released configuration) and channels-last token
grids ``(B, D, H, W, C)`` inside the transformer.

The released weights were trained with "windowed" blocks that zero-pad the ``g^3`` grid to one
``window_size^3`` window and attend over all of it, padding included (reference §1), and with upstream's
relative-position bias, whose per-axis terms land on other axes than the textbook's (``rel_pos_bias``,
see :class:`Attention`). Both are reproduced exactly. The padded window is computed over the real tokens
plus one aggregated key (a closed form); ``fast_window_attention=False`` selects the literal padded
computation, the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock

#: How the three relative-position tables enter the attention logits (see :class:`Attention`).
REL_POS_BIASES = ("upstream", "decomposed")


def resampled_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A ``(L, C)`` rel-pos table with ``rows`` rows, linearly resampled if ``L != rows`` (as upstream)."""
    if table.shape[0] == rows:
        return table
    return F.interpolate(table.t()[None], size=rows, mode="linear").squeeze(0).t()


def _offset_lookup(scores: torch.Tensor, axis: int, size: int, side: int, start: int = 0) -> torch.Tensor:
    """``(B, heads, D, H, W, 2 * side - 1)`` scores ``q . T[r]`` of every table row ``r`` ->
    ``(B, heads, D, H, W, side)`` with entry ``k`` the score of row ``o(a, k) = a - k + side - 1``, where ``a``,
    the coordinate on ``axis`` (0, 1, 2: D, H, W), runs over ``start .. start + size - 1`` along that axis
    (of extent ``size`` or 1)."""
    coordinate = torch.arange(start, start + size, device=scores.device)
    offsets = coordinate[:, None] - torch.arange(side, device=scores.device) + side - 1
    shape = [1, 1, 1, 1, 1, side]
    shape[2 + axis] = size
    out_shape = list(scores.shape[:-1]) + [side]
    out_shape[2 + axis] = size
    return torch.gather(scores.expand(*out_shape[:-1], scores.shape[-1]), -1, offsets.reshape(shape).expand(out_shape))


def _exp_shifted(terms: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(terms - m)`` and ``m``, the maximum over ``dim``: sums of exponentials without overflow."""
    shift = terms.detach().amax(dim, keepdim=True)
    return (terms - shift).exp(), shift.squeeze(dim)


def _safe_log(positive: torch.Tensor) -> torch.Tensor:
    """``log`` of a sum of exponentials, floored where it underflowed (a weight of ``e^-69`` is nothing, but a
    ``-inf`` would make gradients NaN)."""
    return positive.clamp_min(1e-30).log()


class Attention(nn.Module):
    """Multi-head self-attention over a cubic window of ``K^3`` tokens with a 3D relative-position bias.

    The bias added to the logit ``scale * q_i . k_j`` of query ``i = (i_d, i_h, i_w)`` and key ``j`` uses the
    *unscaled* query and three tables ``T_d, T_h, T_w`` of ``2K - 1`` rows; ``o(a, b) = a - b + K - 1``.

    - ``"upstream"``, what the released SAM-Med3D weights were trained with (reference §1, "Quirk"): upstream
      broadcasts its three per-axis terms onto the wrong axes of the logits, which gives
      ``q[i_d, i_h, i_w] . T_d[o(i_d, j_w)] + q[i_d, i_h, j_d] . T_h[o(i_h, j_w)]
      + q[i_d, i_h, j_h] . T_w[o(j_h, j_w)]``
      (the height and width terms read the query of another token of the query's row). It exists only for
      cubic windows.
    - ``"decomposed"``, the textbook bias ``q_i . (T_d[o(i_d, j_d)] + T_h[o(i_h, j_h)] + T_w[o(i_w, j_w)])``.

    Only the real tokens are computed. A grid smaller than the window stands for the leading corner of a
    zero-padded window (the released "windowed" blocks): every padded token has the same query, key and
    value (the qkv bias), and each bias is a sum of terms that depend on at most two key coordinates, so the
    padded keys' summed softmax weight has a closed form. They enter fused attention as one aggregated key
    whose additive bias is that log-weight: exactly the padded computation, at a fraction of its cost.

    Args:
        dim: token width ``C``.
        num_heads: heads; ``C`` must be divisible by it.
        qkv_bias: whether the qkv projection has a bias.
        use_rel_pos: whether to add the relative position bias.
        rel_pos_size: side ``K`` of the window the tables were made for: tables are ``(2K - 1, C / heads)``.
        rel_pos_bias: ``"upstream"`` or ``"decomposed"``.
        name: how errors name this attention (for example ``"block 3"``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        rel_pos_size: int = 8,
        rel_pos_bias: str = "upstream",
        name: str = "attention",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not divisible by num_heads={num_heads}")
        if rel_pos_bias not in REL_POS_BIASES:
            raise ValueError(f"rel_pos_bias must be one of {REL_POS_BIASES}, got {rel_pos_bias!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.rel_pos_bias = rel_pos_bias
        self.name = name
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))

    def _split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, D, H, W, C)`` -> q, k, v each ``(B, heads, D*H*W, C / heads)``."""
        b = x.shape[0]
        qkv = self.qkv(x).reshape(b, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _padding_qkv(self, like: torch.Tensor) -> torch.Tensor:
        """``(3, heads, 1, C / heads)``: the query, key and value of a zero (padded) token."""
        if self.qkv.bias is None:
            return like.new_zeros(3, self.num_heads, 1, self.head_dim)
        return self.qkv.bias.reshape(3, self.num_heads, 1, self.head_dim).to(like.dtype)

    def _attention_mask(
        self, q: torch.Tensor, pad_q: torch.Tensor, grid: Sequence[int], window: Sequence[int]
    ) -> torch.Tensor:
        """The additive mask of fused attention: the bias over the real keys and, when the grid does not fill
        the window, one more column, the log of the summed ``exp(bias)`` over the padded keys.

        Args:
            q: ``(B, heads, gd * gh * gw, c)`` queries of the real tokens (the window's leading corner).
            pad_q: ``(heads, 1, c)`` the query of a padded token.
            grid: ``(gd, gh, gw)``, each side at most the window's.
            window: the window's sides (all equal for the upstream bias).

        Returns:
            ``(B, heads, Nq, Nq)``, or ``(B, heads, Nq, Nq + 1)`` with the padding column; float32.

        Each bias is ``first + rest``: ``first`` depends on the query and one key coordinate, ``rest`` on the
        query's row and two key coordinates (``gd gh gw^2`` or ``gd gh gw^3`` values per head), so the
        ``Nq^2`` bias is written in one pass, in float32: fused attention takes a float32 mask beside bfloat16
        queries at no extra cost.
        """
        b, h, n, c = q.shape
        gd, gh, gw = grid
        padded = tuple(grid) != tuple(window)
        mask = torch.empty(b, h, n, n + 1 if padded else n, dtype=torch.float32, device=q.device)
        own = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w)
        tables = [resampled_table(t, 2 * s - 1) for t, s in zip(own, window)]
        rows = [len(t) for t in tables]
        # q . T[r] for every table row r: one matrix product (under autocast in its lower precision, like
        # every product), then lookups by offset in float32
        table_matrix = torch.cat(tables).t().to(q.dtype)
        scores = (q.reshape(b * h * n, c) @ table_matrix).float().view(b, h, gd, gh, gw, -1)
        if self.rel_pos_bias == "decomposed":
            # a_x[i, k] = q_i . T_x[o(i_x, k)]: each a function of one key coordinate
            a_d, a_h, a_w = (
                _offset_lookup(part, axis, g, side)
                for part, axis, g, side in zip(scores.split(rows, -1), range(3), grid, window)
            )
            first = a_d[..., :gd, None, None]
            rest = a_h[..., None, :gh, None] + a_w[..., None, None, :gw]
            if padded:
                # sum over the padded box = whole window minus the real corner, written as a sum of
                # positive terms (no cancellation): pad_d all_h all_w + real_d pad_h all_w + real_d real_h pad_w
                (e_d, m_d), (e_h, m_h), (e_w, m_w) = (_exp_shifted(t) for t in (a_d, a_h, a_w))
                parts = [(e[..., :g].sum(-1), e[..., g:].sum(-1)) for e, g in ((e_d, gd), (e_h, gh), (e_w, gw))]
                (real_d, pad_d), (real_h, pad_h), (real_w, pad_w) = parts
                all_h, all_w = real_h + pad_h, real_w + pad_w
                padded_sum = pad_d * all_h * all_w + real_d * (pad_h * all_w + real_h * pad_w)
                log_padded = _safe_log(padded_sum) + m_d + m_h + m_w
        else:
            side = window[0]
            # The height and width terms read the query at width index j_d (resp. j_h) of the query's row,
            # which lies in the padding where that index passes the real width.
            score_d, score_h, score_w = scores.split(rows, -1)
            a = _offset_lookup(score_d, 0, gd, side)  # [i, j_w]
            t_h = _offset_lookup(score_h, 1, gh, side)  # [i_d, i_h, j_d, j_w]
            t_w = _offset_lookup(score_w, 2, gw, side)  # [i_d, i_h, j_h, j_w]
            if gw < side:  # the rows' tokens past the real width are padding: the same query
                pad_scores = (pad_q @ table_matrix[:, rows[0] :]).float().reshape(1, h, 1, 1, 1, -1)
                pad_h, pad_w = pad_scores.split(rows[1:], -1)
                more = (b, h, gd, gh, side - gw, side)
                t_h = torch.cat([t_h, _offset_lookup(pad_h, 1, gh, side).expand(more)], 4)
                t_w = torch.cat([t_w, _offset_lookup(pad_w, 2, side - gw, side, start=gw).expand(more)], 4)
            first = a[..., None, None, :gw]
            rest = t_h[..., :gd, :gw][:, :, :, :, None, :, None, :] + t_w[..., :gh, :gw][:, :, :, :, None, None]
            if padded:
                # the sum over a box of keys factorises: sum_{j_w} e^a (sum_{j_d} e^t_h) (sum_{j_h} e^t_w);
                # for each j_w the padded part is all_h all_w where j_w lies in the padding, and
                # pad_h all_w + real_h pad_w where it does not (positive terms: no cancellation)
                (e_h, m_h), (e_w, m_w) = _exp_shifted(t_h, -2), _exp_shifted(t_w, -2)
                real_h, pad_h = e_h[..., :gd, :].sum(-2), e_h[..., gd:, :].sum(-2)
                real_w, pad_w = e_w[..., :gh, :].sum(-2), e_w[..., gh:, :].sum(-2)
                all_w = real_w + pad_w
                in_padding = torch.arange(side, device=q.device) >= gw
                per_column = torch.where(in_padding, (real_h + pad_h) * all_w, pad_h * all_w + real_h * pad_w)
                e_a, m_a = _exp_shifted(a + (m_h + m_w)[:, :, :, :, None])
                padded_sum = (e_a * per_column[:, :, :, :, None]).sum(-1)
                log_padded = _safe_log(padded_sum) + m_a
        bias = mask[..., :n].unflatten(-1, (gd, gh, gw)).unflatten(2, (gd, gh, gw))
        if torch.is_grad_enabled() and (first.requires_grad or rest.requires_grad):
            bias.copy_(first + rest)  # out= does not record gradients
        else:
            torch.add(first, rest, out=bias)
        if padded:
            mask[..., n] = log_padded.reshape(b, h, n)
        return mask

    def _merge_heads(self, out: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``(B, heads, N, C / heads)`` -> projected ``(B, D, H, W, C)``."""
        b = out.shape[0]
        # an explicit copy: exporters decompose attention into other layouts, where a view of the transpose fails
        out = out.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        out = out.view(b, *grid, self.num_heads * self.head_dim)
        return self.proj(out)

    def forward(self, x: torch.Tensor, window_size: int | None = None) -> torch.Tensor:
        """Attention over a window whose leading corner is ``x``.

        Args:
            x: ``(B, D, H, W, C)`` tokens (already normalised by the block).
            window_size: side of the zero-padded window that ``x`` stands for (``D, H, W <= window_size``);
                None: the grid is the window (global attention).

        Returns:
            ``(B, D, H, W, C)``: the outputs of the real tokens.
        """
        grid = tuple(x.shape[1:4])
        window = grid if window_size is None else (window_size,) * 3
        if any(s > w for s, w in zip(grid, window)):
            raise ValueError(f"{self.name}: grid {grid} does not fit in one window of {window_size}")
        if self.use_rel_pos and self.rel_pos_bias == "upstream" and len(set(window)) != 1:
            raise ValueError(
                f"{self.name}: the upstream relative-position bias exists only for cubic token grids, got a "
                f"{grid} grid; give a cubic input, or use a variant built with rel_pos_bias='decomposed'"
            )
        q, k, v = self._split_qkv(x)
        if not self.use_rel_pos:
            if grid != window:
                raise ValueError(f"{self.name}: a padded window needs the relative position tables (use_rel_pos)")
            return self._merge_heads(F.scaled_dot_product_attention(q, k, v), grid)
        pad_q, pad_k, pad_v = self._padding_qkv(q)
        mask = self._attention_mask(q, pad_q, grid, window)
        if mask.shape[-1] > k.shape[2]:  # the aggregated padding key
            b = q.shape[0]
            k = torch.cat([k, pad_k.expand(b, -1, -1, -1)], dim=2)
            v = torch.cat([v, pad_v.expand(b, -1, -1, -1)], dim=2)
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), grid)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad ``(B, D, H, W, C)`` to multiples of ``window_size`` and split it into windows.

    Returns:
        windows ``(B * nW, window_size, window_size, window_size, C)`` and the padded grid.
    """
    b, d, h, w, c = x.shape
    pads = [(window_size - s % window_size) % window_size for s in (d, h, w)]
    x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
    ws = window_size
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (dp, hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_grid: Sequence[int], grid: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows -> ``(B, D, H, W, C)`` with the padding removed."""
    dp, hp, wp = padded_grid
    ws = window_size
    b = windows.shape[0] // ((dp // ws) * (hp // ws) * (wp // ws))
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, : grid[0], : grid[1], : grid[2]].contiguous()


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    Args:
        window_size: 0 for global attention; otherwise the side of the (zero-padded) attention window.
        grid_size: side of the token grid the global rel-pos tables are made for.
        fast_window_attention: use the exact closed form for a grid that fits in one window.
        rel_pos_bias: ``"upstream"`` or ``"decomposed"`` (see :class:`Attention`).
        name: how errors name the block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 0,
        grid_size: int = 8,
        fast_window_attention: bool = True,
        rel_pos_bias: str = "upstream",
        name: str = "block",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias,
            use_rel_pos,
            rel_pos_size=window_size if window_size > 0 else grid_size,
            rel_pos_bias=rel_pos_bias,
            name=name,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size
        self.fast_window_attention = fast_window_attention

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.window_size
        if ws == 0:
            return self.attn(x)
        grid = x.shape[1:4]
        if self.fast_window_attention and self.attn.use_rel_pos and all(s <= ws for s in grid):
            return self.attn(x, ws)
        windows, padded_grid = window_partition(x, ws)
        return window_unpartition(self.attn(windows), ws, padded_grid, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, C)`` -> ``(B, D, H, W, C)``."""
        x = x + self._attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches -> channels-last tokens ``(B, D/p, H/p, W/p, C)``.

    The weights are those of a strided ``Conv3d`` (the checkpoint format), applied as one matrix product over
    the flattened patches: the same sums, and several times faster than CPU convolution under bf16 autocast.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, d // p, h // p, w // p, c * p**3)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class ImageEncoderViT3D(nn.Module):
    """3D ViT image encoder: ``(B, in_chans, D, H, W)`` -> embedding ``(B, out_chans, D/p, H/p, W/p)``.

    Args:
        img_size: side of the cubic input the absolute position embedding was made for (voxels).
        patch_size: side ``p`` of a patch (voxels); every input side must be a multiple of it.
        in_chans: input channels.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP width / token width.
        out_chans: embedding channels after the neck.
        qkv_bias: bias in the qkv projections.
        use_abs_pos: learned absolute position embedding, trilinearly resampled for other input sizes.
        use_rel_pos: relative position bias.
        rel_pos_bias: ``"upstream"`` (the released weights) or ``"decomposed"`` (textbook); see :class:`Attention`.
        window_size: side of the padded attention window of non-global blocks (0: all blocks global).
        global_attn_indexes: blocks that attend over the whole grid.
        fast_window_attention: exact closed form for windowed blocks instead of the padded computation.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        fast_window_attention: bool = True,
        rel_pos_bias: str = "upstream",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.rel_pos_bias = rel_pos_bias
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                grid_size=grid,
                fast_window_attention=fast_window_attention,
                rel_pos_bias=rel_pos_bias,
                name=f"image_encoder.blocks.{i}",
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def set_fast_window_attention(self, enabled: bool) -> None:
        """Switch every windowed block between the exact closed form and the padded computation."""
        for block in self.blocks:
            block.fast_window_attention = enabled

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus absolute position: ``(B, in_chans, D, H, W)`` -> ``(B, D/p, H/p, W/p, C)``."""
        spatial = x.shape[2:]
        if x.ndim != 5 or any(s % self.patch_size for s in spatial):
            raise ValueError(
                f"expected an image (B, C, D, H, W) with sides that are multiples of {self.patch_size}, "
                f"got shape {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:4] != x.shape[1:4]:
                pos = F.interpolate(
                    pos.permute(0, 4, 1, 2, 3), size=x.shape[1:4], mode="trilinear", align_corners=False
                ).permute(0, 2, 3, 4, 1)
            x = x + pos
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
